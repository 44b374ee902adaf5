"""Prefect tasks of the DLP pipeline, one per stage (cli -> flows -> tasks -> pipeline, dlp).

Each task is a thin call into :mod:`pipeline.stages` (the stage's content key, cache and the call into
:mod:`dlp`) and returns its typed result (:mod:`pipeline.results`) in a ``Completed`` or ``Cached`` state. Import-light: prefect is imported by the submodules, not here.
"""
