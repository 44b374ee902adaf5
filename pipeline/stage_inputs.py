"""What each stage is given from the job: the store it writes to, the model settings, the allocation, the
alpha search's settings and the pruner's parameters (plain JSON values: they travel as task parameters)."""

from __future__ import annotations

from typing import Any, Sequence

from pipeline.cache import StoreSpec
from pipeline.results import CalibrationResult

__all__ = ["alloc_settings", "expand_variants", "model_settings", "prune_params", "rates_inputs", "resolve_dtype",
           "search_settings", "store_spec"]


def store_spec(cfg) -> StoreSpec:
    from pipeline.s3 import resolve_s3_endpoint

    uri = cfg.storage_uri
    endpoint = resolve_s3_endpoint(cfg.storage.endpoint_url) if uri.startswith("s3://") else None
    return StoreSpec(uri=uri, workdir=cfg.workdir, endpoint_url=endpoint, region=cfg.storage.region)


def model_settings(cfg) -> dict[str, Any]:
    """What the block-by-block stages run with (the dtype resolved by :func:`resolve_dtype` after fetch)."""
    return {"dtype": cfg.model.dtype, "device": cfg.model.device, "trust_remote_code": cfg.model.trust_remote_code,
            "batch_size": None, "memory_budget": cfg.resources.budget_bytes(),
            "max_shard_size": cfg.resources.max_shard_size}


def resolve_dtype(cfg, model) -> None:
    """``model.dtype: auto`` becomes the fetched checkpoint's own dtype, so cache keys name the real dtype (an
    explicit ``float32`` and ``auto`` on a float32 checkpoint share every artifact)."""
    if cfg.model.dtype == "auto":
        cfg.model.dtype = model.native_dtype


def alloc_settings(cfg) -> dict[str, Any]:
    p = cfg.pruning
    return {"allocation": p.allocation, "sparsity": p.sparsity, "alpha": p.alpha, "statistic": p.statistic,
            "owl_m": p.owl_m, "owl_lambda": p.owl_lambda}


def search_settings(cfg) -> dict[str, Any] | None:
    """The alpha search's settings (``pruning.alpha: auto`` / ``statistic: auto`` under DLP), else None --
    so a fixed-alpha job's rates key is unchanged."""
    p = cfg.pruning
    if p.allocation != "dlp" or (p.alpha != "auto" and p.statistic != "auto"):
        return None
    return {"method": p.method, "pattern": p.pattern, "mode": p.mode, "heldout": p.search.heldout,
            "budget": p.search.budget, "confirm": p.search.confirm, "data_dir": cfg.data_dir}


def rates_inputs(cfg, calib: CalibrationResult) -> dict[str, Any]:
    """Keyword arguments of the rates task besides store/model/stats."""
    search = search_settings(cfg)
    out: dict[str, Any] = {"alloc": alloc_settings(cfg), "settings": model_settings(cfg)}
    if search is not None:
        out.update(calib=calib, search=search)
    return out


def prune_params(cfg) -> dict[str, Any]:
    p = cfg.pruning
    return {"method": p.method, "mode": p.mode, "pattern": p.pattern, **model_settings(cfg)}


def expand_variants(base, methods: Sequence[str] | None = None, allocations: Sequence[str] | None = None,
                    sparsities: Sequence[float] | None = None, alphas: Sequence[float | str] | None = None) -> list:
    """Job configs of every (method, allocation, sparsity, alpha) combination; alpha only varies the DLP
    allocation (duplicates dropped). Invalid values raise JobError (validated on assignment), and so does a
    ``recovery:`` block, which a sweep does not run (its variants would be named recovered)."""
    from pipeline.jobconfig import JobError

    if base.recovery is not None:
        raise JobError("sweep: the job has a recovery: block, which dlp sweep does not run; remove it, or run "
                       "dlp compress for the variant to recover")
    methods = list(methods or [base.pruning.method])
    allocations = list(allocations or [base.pruning.allocation])
    sparsities = [float(s) for s in (sparsities or [base.pruning.sparsity])]
    alphas = [a if a == "auto" else float(a) for a in (alphas or [base.pruning.alpha])]
    out, seen = [], set()
    for method in methods:
        for allocation in allocations:
            for p in sparsities:
                for a in (alphas if allocation == "dlp" else [base.pruning.alpha]):
                    v = base.model_copy(deep=True)
                    try:
                        v.pruning.method = method
                        v.pruning.allocation = allocation
                        v.pruning.sparsity = p
                        v.pruning.alpha = a
                    except Exception as e:  # pydantic ValidationError -> one line
                        msg = str(e).splitlines()
                        raise JobError(f"sweep: invalid variant {method}/{allocation}/p={p}/alpha={a}: "
                                       f"{msg[-1].strip() if msg else e}") from None
                    name = v.variant_name()
                    if name not in seen:
                        seen.add(name)
                        out.append(v)
    return out
