"""The work of each pipeline stage, without Prefect: content key, cache (:func:`pipeline.cache.run_cached`),
the call into :mod:`dlp`, and a typed result (:mod:`pipeline.results`). ``tasks/`` wraps each in one task.

- :mod:`pipeline.stages.fetch`       -- resolve the base model and its content hash
- :mod:`pipeline.stages.statistics`  -- calibration windows and block statistics
- :mod:`pipeline.stages.rates`       -- per-block rates (uniform, OWL, DLP; the alpha search)
- :mod:`pipeline.stages.prune`       -- the pruned checkpoint
- :mod:`pipeline.stages.evaluate`    -- perplexity and zero-shot (pruned and dense baseline)
- :mod:`pipeline.stages.register`    -- the MLflow run and model version of a variant
"""
