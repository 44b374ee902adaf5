"""Stage 3 -- per-block sparsity rates (uniform, OWL or DLP) from the stored statistics.

Thin over :func:`dlp.allocation.allocate`; the artifact is ``rates/<key>/rates.json`` (deterministic JSON:
same inputs, same bytes). Key: the statistics key and only the allocation parameters that matter for the
chosen allocation -- ``uniform``: p (and the block count); ``dlp``: p, alpha, statistic; ``owl``: p, M, lambda.
So changing alpha recomputes the DLP rates (and, as the ratios change, everything after), never the
statistics; changing alpha under a uniform allocation changes nothing.

``alpha: auto`` / ``statistic: auto`` (DLP): the rates come from :func:`dlp.autoalpha.choose_alpha`, which
scores candidates by the pruned model's perplexity on calibration windows held out from the statistics. The
key then also holds what the choice depends on: the calibration windows (the held-out ones are drawn right
after them), the pruner, pattern and the search settings. Every candidate's proxy is cached on its own in
the store (``alpha-candidates/<context>/<candidate>.json``, context = statistics, calibration, held-out
count, pattern, sparsity, dtype), so a search killed half-way resumes where it stopped, and another search
over the same context (another budget, SparseGPT screened with Wanda after a Wanda search, a sweep) reuses
every candidate it shares. The proxy curve (JSON + PNG) is stored beside ``rates.json`` and logged to MLflow
with the variant by the register stage.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import MutableMapping
from typing import Any, Iterator, Mapping

from pipeline.cache import (
    StoreSpec,
    content_key,
    hook,
    json_put,
    run_cached,
    stage_logger,
)
from pipeline.results import CalibrationResult, FetchResult, RatesResult, StatisticsResult
from pipeline.stages.statistics import load_statistics, load_windows


def is_auto(alloc: Mapping[str, Any]) -> bool:
    """DLP with ``alpha: auto`` or ``statistic: auto`` (the rule: :func:`dlp.recipe.is_auto`)."""
    from dlp.recipe import is_auto as auto

    return auto(alloc["allocation"], alloc.get("alpha"), alloc.get("statistic"))


def allocation_params(alloc: Mapping[str, Any]) -> dict[str, Any]:
    """The allocation settings that determine the rates (see the module docstring)."""
    method = alloc["allocation"]
    out: dict[str, Any] = {"allocation": method, "sparsity": float(alloc["sparsity"])}
    if method == "dlp":
        out["alpha"] = alloc["alpha"] if alloc["alpha"] == "auto" else float(alloc["alpha"])
        out["statistic"] = alloc["statistic"]
    elif method == "owl":
        out["owl_m"] = float(alloc["owl_m"])
        out["owl_lambda"] = float(alloc["owl_lambda"])
    return out


def search_params(search: Mapping[str, Any]) -> dict[str, Any]:
    """The search settings that determine the chosen alpha (not where the data lives)."""
    return {k: search.get(k) for k in ("method", "pattern", "mode", "heldout", "budget", "confirm")}


def candidates_context(stats: StatisticsResult, calib: CalibrationResult, alloc: Mapping[str, Any],
                       search: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """What a candidate's proxy depends on besides (pruner, alpha, statistic)."""
    return content_key("alpha-candidates", statistics=stats.key, calibration=calib.key,
                       heldout=search.get("heldout"), pattern=search["pattern"], sparsity=float(alloc["sparsity"]),
                       dtype=settings.get("dtype"))


def rates_key(stats: StatisticsResult, alloc: Mapping[str, Any], calib: CalibrationResult | None = None,
              search: Mapping[str, Any] | None = None) -> str:
    params = allocation_params(alloc)
    if params["allocation"] == "uniform":  # needs nothing from the statistics but the block count
        return content_key("rates", blocks=stats.num_blocks, **params)
    if is_auto(alloc):
        from dlp.autoalpha.choose import SEARCH_VERSION

        if calib is None or search is None:
            raise ValueError("alpha/statistic 'auto' needs the calibration manifest and the search settings")
        return content_key("rates", statistics=stats.key, calibration=calib.key, search=search_params(search),
                           rule=SEARCH_VERSION, **params)
    return content_key("rates", statistics=stats.key, **params)


class StoredCandidates(MutableMapping):
    """The search's per-candidate cache: one small JSON object per candidate in the artifact store (written
    atomically, so a killed search keeps every candidate it finished): the candidate's key and its
    :meth:`dlp.autoalpha.Score.to_json` (proxy, per-window held-out losses, seconds)."""

    def __init__(self, store, prefix: str):
        self.store, self.prefix = store, prefix.rstrip("/")
        self.hits = 0

    def _key(self, candidate: str) -> str:
        return f"{self.prefix}/{re.sub(r'[^A-Za-z0-9._-]', '_', candidate)}.json"

    def __contains__(self, candidate: object) -> bool:
        return isinstance(candidate, str) and self.store.exists(self._key(candidate))

    def __getitem__(self, candidate: str) -> dict:
        try:
            body = json.loads(self.store.read_bytes(self._key(candidate)))
        except (FileNotFoundError, ValueError) as e:
            raise KeyError(candidate) from e
        self.hits += 1
        return {k: v for k, v in body.items() if k != "candidate"}

    def __setitem__(self, candidate: str, value: Mapping[str, Any]) -> None:
        self.store.write_bytes(self._key(candidate), json.dumps({"candidate": candidate, **finite_json(value)}).encode())
        hook("alpha-candidate", "computed")

    def __delitem__(self, candidate: str) -> None:
        self.store.delete_prefix(self._key(candidate))

    def __iter__(self) -> Iterator[str]:
        for k in self.store.list_keys(self.prefix + "/"):
            yield json.loads(self.store.read_bytes(k))["candidate"]

    def __len__(self) -> int:
        return len(self.store.list_keys(self.prefix + "/"))


def finite_json(obj: Any) -> Any:
    """JSON-safe: +-inf / NaN -> None (rates.json is strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def choose_rates(spec: StoreSpec, st, model: FetchResult, calib: CalibrationResult, stats: StatisticsResult,
                 alloc: Mapping[str, Any], search: Mapping[str, Any], settings: Mapping[str, Any], folder: str,
                 logger) -> tuple[Any, Any, dict[str, Any]]:
    """Run the alpha search; returns (allocation, statistics, summary). The curve lands in ``folder``."""
    import tempfile
    from pathlib import Path

    from dlp import data
    from dlp.autoalpha import choose_alpha_from_text
    from dlp.models import load_model, resolve_device

    params = allocation_params(alloc)
    bs = load_statistics(spec, stats)
    net, tok, _ref = load_model(model.ref.model_ref(), dtype=settings["dtype"],
                                trust_remote_code=settings.get("trust_remote_code", False))
    windows = load_windows(spec, calib)
    cache = StoredCandidates(st, f"alpha-candidates/{candidates_context(stats, calib, alloc, search, settings)}")
    logger.info("rates: choosing DLP alpha%s for %s %s at p=%.3g (proxy: perplexity on held-out calibration "
                "windows; %d candidates already cached)", " and statistic" if params["statistic"] == "auto" else "",
                search["method"], search["pattern"], params["sparsity"], len(cache))
    result = choose_alpha_from_text(net, tok, bs, windows, data.load_text(calib.source, search.get("data_dir")),
                                    nsamples=calib.nsamples, seqlen=calib.seqlen, seed=calib.seed,
                                    heldout=search.get("heldout"), method=search["method"], pattern=search["pattern"],
                                    mode=search.get("mode", "sequential"), sparsity=params["sparsity"],
                                    statistic=params["statistic"], device=resolve_device(settings.get("device")),
                                    budget=search.get("budget"), confirm=int(search.get("confirm") or 2),
                                    alpha=None if params["alpha"] == "auto" else float(params["alpha"]),
                                    batch_size=settings.get("batch_size"), cache=cache)
    del net
    with tempfile.TemporaryDirectory(prefix="dlp-alpha-") as tmp:
        json_path, png_path = result.save(Path(tmp))
        body = finite_json(json.loads(json_path.read_text()))
        curve_put = json_put(st, f"{folder}/alpha_search.json", body)
        plot_put = st.put_file(png_path, f"{folder}/alpha_search.png")
    summary = {
        "alpha": result.alpha, "statistic": result.statistic, "proxy": finite_json(result.proxy),
        "uniform_proxy": finite_json(result.uniform_proxy), "cost": result.cost, "evaluations": result.cost["evaluations"],
        "cached_candidates": cache.hits, "points": len(result.curve), "alpha_max": result.alpha_max,
        "screen_pruner": result.settings.get("screen_pruner"), "final_pruner": result.settings.get("final_pruner"),
        "decision": finite_json(result.decision), "confirm": result.settings.get("confirm"),
        "heldout_windows": result.settings["heldout"]["windows"],
        "curve_key": f"{folder}/alpha_search.json", "plot_key": f"{folder}/alpha_search.png",
        "curve_uri": curve_put.uri, "curve_sha256": curve_put.sha256, "plot_uri": plot_put.uri,
        "plot_sha256": plot_put.sha256,
    }
    logger.info("rates: chose alpha=%.4f (%s), proxy %.3f vs uniform %s; %d evaluated, %d cached, %.1fs",
                result.alpha, result.statistic, result.proxy,
                "n/a" if result.uniform_proxy is None else f"{result.uniform_proxy:.3f}",
                result.cost["evaluations"], cache.hits, result.cost["seconds"])
    return result.allocation(), bs, summary


def _fixed_rates(spec: StoreSpec, model: FetchResult, stats: StatisticsResult, params: Mapping[str, Any],
                 settings: Mapping[str, Any]) -> tuple[Any, Any]:
    """(allocation, statistics) for a fixed alpha/statistic (or OWL, uniform)."""
    from dlp.allocation import allocate

    bs = load_statistics(spec, stats)
    if params["allocation"] == "owl":  # another M: outlier ratios from the weights, streamed block by block
        from dlp.recipe import statistics_with_owl_m
        from dlp.streaming import open_streamed

        bs = statistics_with_owl_m(bs, lambda: open_streamed(
            model.ref.path, dtype=settings["dtype"], trust_remote_code=settings.get("trust_remote_code", False)),
            params["owl_m"])
    result = allocate(bs, params["allocation"], params["sparsity"], alpha=params.get("alpha", 0.15),
                      statistic=params.get("statistic", "median"), owl_lambda=params.get("owl_lambda", 0.08))
    return result, bs


def compute_rates(store: StoreSpec | Mapping[str, Any], model: FetchResult, stats: StatisticsResult,
                  alloc: Mapping[str, Any], settings: Mapping[str, Any], calib: CalibrationResult | None = None,
                  search: Mapping[str, Any] | None = None) -> RatesResult:
    spec = StoreSpec.of(store)
    key = rates_key(stats, alloc, calib, search)
    artifact_key = f"rates/{key}/rates.json"
    params = allocation_params(alloc)
    logger = stage_logger("rates")

    def compute(st):
        t0 = time.perf_counter()
        chosen = None
        if is_auto(alloc):
            result, bs, chosen = choose_rates(spec, st, model, calib, stats, alloc, search, settings,
                                              artifact_key.rsplit("/", 1)[0], logger)
        else:
            result, bs = _fixed_rates(spec, model, stats, params, settings)
        stat_choice = chosen["statistic"] if chosen else params.get("statistic", "median")
        statistic_name = {"dlp": stat_choice, "owl": "owl_outlier_ratio"}.get(params["allocation"], "median")
        figures = {"ratios": [float(r) for r in result.ratios], "params": params, "statistic_name": statistic_name,
                   "block_statistic": [float(v) for v in bs.statistic(statistic_name)]}
        if chosen:
            figures["alpha_search"] = chosen
        put = json_put(st, artifact_key, {**finite_json(result.to_json()), **figures})
        logger.info("rates: %s p=%.3g -> blocks %.3f..%.3f", params["allocation"], params["sparsity"],
                    min(result.ratios), max(result.ratios))
        return put, {**figures, "compute_seconds": round(time.perf_counter() - t0, 3)}

    return run_cached(spec, "rates", key, artifact_key, compute).typed(RatesResult)
