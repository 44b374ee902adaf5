"""Prefect tasks of the DLP pipeline, one per stage (cli -> flows -> tasks -> pipeline, dlp).

Each task is a thin call: the stage's content key and cache come from :mod:`pipeline`, the work from
:mod:`dlp`. Import-light: prefect is imported by the submodules, not here.
"""
