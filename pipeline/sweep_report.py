"""The report of a sweep: one row per variant, the comparison table, the perplexity-vs-sparsity plot, and
the MLflow ``sweep`` run that holds them (one per distinct set of variants: a rerun reuses it)."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["COLUMNS", "SWEEP_TAG", "format_table", "log_sweep", "plot_sweep", "sweep_row"]

SWEEP_TAG = "dlp.sweep_key"

COLUMNS = ("variant", "method", "allocation", "sparsity", "alpha", "chosen", "achieved", "ppl", "dense_ppl", "ppl_ratio",
           "zero_shot_mean_acc", "version", "status")


def sweep_row(v, summary: Mapping[str, Any] | None, error: str | None) -> dict[str, Any]:
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


def log_sweep(job: Mapping[str, Any], rows: list[dict[str, Any]], sweep_key: str, axes: Mapping[str, Any],
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
