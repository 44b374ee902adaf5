"""Pipeline infrastructure, with no Prefect decorators (cli -> flows -> tasks -> pipeline, dlp):

- :mod:`pipeline.store`     -- artifact store (local folder or S3, through fsspec/s3fs), atomic writes
- :mod:`pipeline.digests`   -- sha256 of files and directory artifacts, the ``_COMPLETE`` table
- :mod:`pipeline.manifest`  -- per-stage manifests, written last; verified before a cache hit is trusted
- :mod:`pipeline.cache`     -- content keys and the one cache: a stage runs unless its verified manifest exists
- :mod:`pipeline.jobconfig` -- the YAML job file (pydantic v2; bounds come from dlp/); jobyaml, jobmessages
- :mod:`pipeline.registry`  -- MLflow 3 experiment / run / registered-model helpers (idempotent per variant)
- :mod:`pipeline.variants`  -- registered versions as Variants, the model table
- :mod:`pipeline.promotion` -- the promotion gate
- :mod:`pipeline.report`    -- the HTML report (charts: :mod:`pipeline.charts`)
- :mod:`pipeline.releases`  -- where new model releases are found (hub, local folders)
- :mod:`pipeline.preflight` -- cheap checks (S3, MLflow, workdir) before any expensive stage

Import-light: no torch, prefect, mlflow or s3fs at import time.
"""
