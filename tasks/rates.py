"""Stage 3 -- per-block sparsity rates (uniform, OWL or DLP) from the stored statistics.

Thin over :func:`dlp.allocation.allocate`; the artifact is ``rates/<key>/rates.json`` (deterministic JSON:
same inputs, same bytes). Key: the statistics key and only the allocation parameters that matter for the
chosen allocation -- ``uniform``: p (and the block count); ``dlp``: p, alpha, statistic; ``owl``: p, M, lambda.
So changing alpha recomputes the DLP rates (and, as the ratios change, everything after), never the
statistics; changing alpha under a uniform allocation changes nothing.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

from prefect import task

from tasks.caching import (
    StoreSpec,
    content_key,
    json_put,
    prefect_cache_key_fn,
    retry_on_storage_error,
    run_cached,
    stage_logger,
)
from tasks.statistics import load_statistics


def allocation_params(alloc: Mapping[str, Any]) -> dict[str, Any]:
    """The allocation settings that determine the rates (see the module docstring)."""
    method = alloc["allocation"]
    out: dict[str, Any] = {"allocation": method, "sparsity": float(alloc["sparsity"])}
    if method == "dlp":
        out["alpha"] = float(alloc["alpha"])
        out["statistic"] = alloc["statistic"]
    elif method == "owl":
        out["owl_m"] = float(alloc["owl_m"])
        out["owl_lambda"] = float(alloc["owl_lambda"])
    return out


def rates_key(stats: Mapping[str, Any], alloc: Mapping[str, Any]) -> str:
    params = allocation_params(alloc)
    if params["allocation"] == "uniform":  # needs nothing from the statistics but the block count
        return content_key("rates", blocks=stats["manifest"]["figures"]["num_blocks"], **params)
    return content_key("rates", statistics=stats["key"], **params)


def _keys(p: dict[str, Any]) -> tuple[str, str]:
    key = rates_key(p["stats"], p["alloc"])
    return key, f"rates/{key}/rates.json"


def compute_rates(store: Mapping[str, Any], model: Mapping[str, Any], stats: Mapping[str, Any], alloc: Mapping[str, Any],
                  settings: Mapping[str, Any]) -> dict[str, Any]:
    from dlp.allocation import allocate

    spec = StoreSpec.of(store)
    key, artifact_key = _keys({"stats": stats, "alloc": alloc})
    params = allocation_params(alloc)
    logger = stage_logger("rates")

    def compute(st):
        t0 = time.perf_counter()
        bs = load_statistics(spec, stats)
        if params["allocation"] == "owl" and params["owl_m"] != bs.owl_m:
            from dlp.models import ModelRef, load_model

            net, _tok, _ref = load_model(ModelRef(**model["ref"]), dtype=settings["dtype"],
                                         trust_remote_code=settings.get("trust_remote_code", False))
            bs = bs.with_owl_m(net, params["owl_m"])
            del net
        result = allocate(bs, params["allocation"], params["sparsity"], alpha=params.get("alpha", 0.15),
                          statistic=params.get("statistic", "median"), owl_lambda=params.get("owl_lambda", 0.08))
        statistic_name = {"dlp": params.get("statistic", "median"), "owl": "owl_outlier_ratio"}.get(params["allocation"], "median")
        body = {
            **result.to_json(),
            "ratios": [float(r) for r in result.ratios],
            "params": params,
            "statistic_name": statistic_name,
            "block_statistic": [float(v) for v in bs.statistic(statistic_name)],
        }
        put = json_put(st, artifact_key, body)
        secs = round(time.perf_counter() - t0, 3)
        logger.info("rates: %s p=%.3g -> blocks %.3f..%.3f", params["allocation"], params["sparsity"],
                    min(result.ratios), max(result.ratios))
        return put, {"ratios": body["ratios"], "params": params, "statistic_name": statistic_name,
                     "block_statistic": body["block_statistic"], "compute_seconds": secs}

    return run_cached(spec, "rates", key, artifact_key, compute)


@task(name="rates", cache_key_fn=prefect_cache_key_fn("rates", _keys), persist_result=True, result_serializer="json",
      retries=2, retry_delay_seconds=2, retry_condition_fn=retry_on_storage_error)
def rates_task(store: dict[str, Any], model: dict[str, Any], stats: dict[str, Any], alloc: dict[str, Any],
               settings: dict[str, Any]) -> dict[str, Any]:
    return compute_rates(store, model, stats, alloc, settings)
