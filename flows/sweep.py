"""The ``sweep`` flow: statistics ONCE, then many variants fanned out through a Prefect task runner.

    fetch -> calibration -> statistics -> baseline            (once, shared)
      \\-> for each (method, allocation, sparsity, alpha): rates -> prune -> evaluate -> register

The variants run through the flow's task runner: ``ThreadPoolTaskRunner`` by default, or
``prefect_dask.DaskTaskRunner`` (``sweep.with_options(task_runner=DaskTaskRunner(...))``, ``dlp sweep --dask``).
Every stage keeps its content key, so a rerun or a larger sweep reuses everything already computed. At the
end a comparison table and a plot (perplexity vs sparsity per allocation) are logged to MLflow in a
``sweep`` run (one per distinct set of variants: a rerun reuses it).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.jobconfig import resolve_job
from flows.compress import prepare, prune_params, rates_inputs, stage_record, summarize
from pipeline.cache import content_key, stage_logger
from tasks.evaluate import evaluate_task
from tasks.prune import prune_task
from tasks.rates import rates_task
from tasks.register import register_task

log = logging.getLogger("dlp.pipeline")

SWEEP_TAG = "dlp.sweep_key"

__all__ = ["expand_variants", "format_table", "sweep", "plot_sweep"]


# ============================================================================================ variants
def expand_variants(base, methods: Sequence[str] | None = None, allocations: Sequence[str] | None = None,
                    sparsities: Sequence[float] | None = None, alphas: Sequence[float | str] | None = None) -> list:
    """Job configs of every (method, allocation, sparsity, alpha) combination; alpha only varies the DLP
    allocation (duplicates dropped). Invalid values raise JobError (validated on assignment)."""
    from pipeline.jobconfig import JobError

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


# ============================================================================================ table / plot
COLUMNS = ("variant", "method", "allocation", "sparsity", "alpha", "chosen", "achieved", "ppl", "dense_ppl", "ppl_ratio",
           "zero_shot_mean_acc", "version", "status")


def _row(v, summary: Mapping[str, Any] | None, error: str | None) -> dict[str, Any]:
    p = v.pruning
    row: dict[str, Any] = {"variant": v.variant_name(), "method": p.method, "allocation": p.allocation,
                           "sparsity": p.sparsity, "alpha": p.alpha if p.allocation == "dlp" else None}
    row["chosen"] = None  # DLP: the alpha and statistic the rates used (the search's choice under auto)
    if summary and p.allocation == "dlp":
        ch = summary.get("allocation") or {}
        if ch.get("alpha") is not None:
            row["chosen"] = f"{float(ch['alpha']):.4g} {ch.get('statistic')}"
    if summary:
        dense, ppl = summary.get("dense_ppl"), summary.get("pruned_ppl")
        zs = summary.get("zero_shot") or {}
        row.update({"achieved": summary["achieved_sparsity"], "ppl": ppl, "dense_ppl": dense,
                    "ppl_ratio": (ppl / dense) if ppl and dense else None, "zero_shot_mean_acc": zs.get("mean_acc"),
                    "version": summary["version"], "status": "ok"})
    else:
        row.update({"achieved": None, "ppl": None, "dense_ppl": None, "ppl_ratio": None, "zero_shot_mean_acc": None,
                    "version": None, "status": f"failed: {error}"})
    return row


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.3f}"
    return str(v)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """A plain-text (Markdown-compatible) table."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(x.ljust(w) for x, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str | Path, dense_ppl: float | None = None) -> Path:
    """PNG: perplexity vs target sparsity, one line per (method, allocation[, alpha])."""
    from pipeline.charts import line_chart

    groups: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.get("ppl") is None:
            continue
        alpha = r.get("alpha")
        label = f"{r['method']} / {r['allocation']}" + ("" if alpha is None else f" a={alpha:g}" if isinstance(alpha, float) else f" a={alpha}")
        groups.setdefault(label, []).append((float(r["sparsity"]), float(r["ppl"])))
    series = [{"label": label, "x": [x for x, _ in sorted(pts)], "y": [y for _, y in sorted(pts)]}
              for label, pts in sorted(groups.items())]
    ys = [y for pts in groups.values() for _, y in pts]
    fig = line_chart(series, title="perplexity vs sparsity per allocation", xlabel="target sparsity",
                     ylabel="perplexity", log_y=bool(ys) and min(ys) > 0 and max(ys) / min(ys) > 20,
                     hlines=[(dense_ppl, f"dense ({dense_ppl:.2f})")] if dense_ppl else [], size=(9.0, 4.5))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


@task(name="log-sweep", cache_policy=NO_CACHE)
def log_sweep_task(job: dict[str, Any], rows: list[dict[str, Any]], sweep_key: str, axes: dict[str, Any],
                   dense_ppl: float | None) -> dict[str, Any]:
    """One MLflow run for the sweep: comparison table (md, csv, json) + plot; reused when it exists."""
    import mlflow

    from pipeline import registry
    from pipeline.jobconfig import JobConfig

    cfg = JobConfig.model_validate(job)
    client = registry.get_client(cfg.registry.tracking_uri, cfg.workdir_path)
    exp_id = registry.ensure_experiment(cfg.registry.experiment, cfg.registry.artifact_location,
                                        tracking_uri=cfg.registry.tracking_uri, workdir=cfg.workdir_path)
    complete = all(r["status"] == "ok" for r in rows)
    if complete:
        found = client.search_runs([exp_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_key}' and attributes.status = 'FINISHED'",
                                   max_results=1)
        if found:
            return {"run_id": found[0].info.run_id, "reused": True}
    with mlflow.start_run(experiment_id=exp_id, run_name=f"sweep-{sweep_key[:8]}",
                          tags={SWEEP_TAG: sweep_key if complete else f"{sweep_key}-partial", "dlp.kind": "sweep"}) as run:
        mlflow.log_params({k: json.dumps(v) if not isinstance(v, str) else v for k, v in axes.items()})
        mlflow.log_param("variants", len(rows))
        if dense_ppl is not None:
            mlflow.log_metric("ppl.dense", float(dense_ppl))
        best = [r for r in rows if r.get("ppl") is not None]
        if best:
            mlflow.log_metric("ppl.best", min(r["ppl"] for r in best))
        with tempfile.TemporaryDirectory(prefix="dlp-sweep-") as tmp:
            t = Path(tmp)
            (t / "comparison.md").write_text(format_table(rows) + "\n")
            (t / "comparison.json").write_text(json.dumps(rows, indent=1))
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=list(COLUMNS))
            w.writeheader()
            for r in rows:
                w.writerow({c: r.get(c) for c in COLUMNS})
            (t / "comparison.csv").write_text(buf.getvalue())
            plot_sweep(rows, t / "ppl_vs_sparsity.png", dense_ppl)
            mlflow.log_artifacts(str(t), artifact_path="sweep")
        return {"run_id": run.info.run_id, "reused": False}


# ============================================================================================ the flow
@flow(name="sweep", task_runner=ThreadPoolTaskRunner(max_workers=2))
def sweep(job: dict | None = None, job_file: str | None = None, overrides: dict | None = None,
          methods: list[str] | None = None, allocations: list[str] | None = None,
          sparsities: list[float] | None = None, alphas: list[float | Literal["auto"]] | None = None) -> dict:
    """Statistics once, then every variant (rates -> prune -> evaluate -> register) through the task runner.

    Returns ``{"variants": [compress-like summary per variant], "failed": [{"variant", "error"}],
    "table": str, "rows": [...], "stages": {shared stages}, "sweep_run_id", "dense_ppl"}``."""
    t0 = time.perf_counter()
    base = resolve_job(job, job_file, overrides)
    variants = expand_variants(base, methods, allocations, sparsities, alphas)
    logger = stage_logger("sweep")
    logger.info("sweep: %d variants of %s: %s", len(variants), base.model.source, ", ".join(v.variant_name() for v in variants))
    stages: dict[str, Any] = {}
    spec, model, calib, stats, espec, baseline = prepare(base, stages)
    store = spec.as_dict()
    submitted = []
    for v in variants:
        t_sub = time.perf_counter()
        rates_f = rates_task.submit(store=store, model=model, stats=stats, **rates_inputs(v, calib))
        prune_f = prune_task.submit(store=store, model=model, calib=calib, stats=stats, rates=rates_f,
                                                       params=prune_params(v))
        eval_f = evaluate_task.submit(store=store, target={"kind": "pruned", "prune": prune_f, "model": model},
                                                         spec=espec)
        reg_f = register_task.submit(store=store, job=v.model_dump(mode="json"), model=model, calib=calib, stats=stats,
                                     rates=rates_f, prune=prune_f, evaluation=eval_f, baseline=baseline)
        submitted.append((v, t_sub, {"rates": rates_f, "prune": prune_f, "evaluate": eval_f, "register": reg_f}))
    summaries, failed, rows = [], [], []
    for v, t_sub, futs in submitted:
        try:
            res = {name: f.result() for name, f in futs.items()}
        except Exception as e:  # noqa: BLE001 -- one variant failing does not lose the others
            msg = " ".join(str(e).split()) or type(e).__name__
            logger.error("sweep: variant %s failed: %s", v.variant_name(), msg)
            failed.append({"variant": v.variant_name(), "error": f"{type(e).__name__}: {msg}"})
            rows.append(_row(v, None, msg))
            continue
        vstages = dict(stages)
        for name, f in futs.items():
            vstages[name] = stage_record(f.state, res[name], 0.0)
            vstages[name]["seconds"] = None  # ran concurrently: no per-stage wall time
        s = summarize(v, model, stats, res["rates"], res["prune"], res["evaluate"], baseline, res["register"], vstages)
        summaries.append(s)
        rows.append(_row(v, s, None))
    keys = sorted(s["variant_key"] for s in summaries)
    sweep_key = content_key("variant", sweep=keys, failed=sorted(f["variant"] for f in failed))
    axes = {"methods": sorted({v.pruning.method for v in variants}), "allocations": sorted({v.pruning.allocation for v in variants}),
            "sparsities": sorted({v.pruning.sparsity for v in variants}),
            "alphas": sorted({v.pruning.alpha for v in variants if v.pruning.allocation == "dlp"}, key=str),
            "model": base.model.source}
    table = format_table(rows)
    logger.info("sweep: comparison\n%s", table)
    logged = log_sweep_task(job=base.model_dump(mode="json"), rows=rows, sweep_key=sweep_key, axes=axes,
                            dense_ppl=baseline.get("ppl"))
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return {
        "task_runner": type(ctx.task_runner).__name__ if ctx is not None else None,
        "variants": summaries,
        "failed": failed,
        "rows": rows,
        "table": table,
        "stages": stages,
        "dense_ppl": baseline.get("ppl"),
        "sweep_run_id": logged["run_id"],
        "sweep_key": sweep_key,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def dask_runner(workers: int = 1, threads: int = 2, processes: bool = False):
    """A DaskTaskRunner on a local cluster (in-process workers by default: no extra interpreter startup)."""
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": threads, "processes": processes,
                                          "dashboard_address": None})

