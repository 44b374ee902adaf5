"""Prefect task layer of the DLP pipeline.

Layout rule: ``flows/`` -> ``tasks/`` -> ``dlp/`` (one way). This package holds the thin task wrappers
(cache keys, storage, retries) and the pipeline infrastructure they share:

- :mod:`tasks.storage`   -- artifact store (local folder or S3), atomic writes, sha256 while writing
- :mod:`tasks.manifest`  -- per-stage manifests, written last; ``verify`` before trusting a cache hit
- :mod:`tasks.registry`  -- MLflow 3 experiment / run / registered-model helpers (idempotent per variant)
- :mod:`tasks.jobconfig` -- the YAML job file (pydantic v2, unknown keys are errors)
- :mod:`tasks.preflight` -- cheap checks (S3, MLflow, workdir) before any expensive stage

Keep this module import-light: no torch, prefect, mlflow or boto3 at import time.
"""
