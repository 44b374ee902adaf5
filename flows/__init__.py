"""Prefect flows of the DLP pipeline: the DAGs only (cli -> flows -> tasks -> pipeline, dlp).

- :func:`flows.compress.compress` -- one job: fetch -> calibration -> statistics -> rates -> prune ->
  baseline/evaluate -> register; returns a JSON-able summary.
- :func:`flows.sweep.sweep` -- statistics once, many variants fanned out through a task runner.
- :func:`flows.watch.watch_releases` -- compress each new release of the watched models.

Importing this package does not import prefect; import the submodules for the flows.
"""
