"""Comparison report of a registered DLP model: one self-contained HTML page (matplotlib charts inlined as SVG,
inline CSS, no external assets, no JavaScript) with

1. the per-block achieved sparsity profile of each variant (one line per version),
2. perplexity vs achieved sparsity, one series per method/allocation, with the dense baseline,
3. a metrics table (method, allocation, sparsity, perplexity, ratio to dense, zero-shot mean, aliases ...).

:func:`build_report` writes the page, logs it to MLflow (a run tagged ``dlp.report_for=NAME`` in the
experiment of the newest variant, artifact ``report/<name>.html``; the registered model gets the tags
``dlp.report_run_id`` / ``dlp.report_uri``) and, inside a Prefect flow run, publishes a markdown artifact
(key ``dlp-report-<name>``) with the table and the report's location.
"""

from __future__ import annotations

import html
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pipeline import registry as reg
from pipeline.charts import line_chart, svg_markup
from pipeline.variants import CHAMPION_ALIAS, TABLE_COLUMNS, Variant, load_variants, table_rows

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

__all__ = ["build_report", "render_html", "publish_prefect_artifact", "log_report_to_mlflow"]

REPORT_TAG = "dlp.report_for"
#: (line style, marker) of a per-block profile by allocation
ALLOCATION_STYLE = {"dlp": ("-", "o"), "owl": (":", "^"), "uniform": ("--", "s")}
OTHER_STYLE = ("-.", "D")


# ============================================================================================ page
CSS = """
body{font-family:Helvetica,Arial,sans-serif;margin:24px;color:#222;background:#fafafa;max-width:1180px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;font-size:13px;margin-bottom:12px} .meta code{background:#eee;padding:1px 4px;border-radius:3px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px;margin:10px 0;overflow-x:auto}
table{border-collapse:collapse;font-size:12.5px;width:100%} th,td{padding:4px 7px;border-bottom:1px solid #eee;white-space:nowrap}
th{background:#f0f0f0;text-align:left;position:sticky;top:0} td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
table.narrow{width:auto;min-width:40%}
tr.champion td{background:#fff8dc;font-weight:bold} .note{color:#666;font-size:12px}
.badge{display:inline-block;background:#2c7be5;color:#fff;border-radius:3px;padding:0 5px;font-size:11px;margin-right:3px}
.badge.champion{background:#c98a00}
"""
_NUMERIC_COLS = {"version", "target", "sparsity", "ppl", "dense ppl", "ratio", "zero-shot", "zs drop", "stored",
                 "of dense"}


def _series_key(v: Variant) -> str:
    key = "/".join(p for p in (v.method, v.allocation) if p) or "variant"
    return key + " + LoRA" if v.recovered else key


def _profiles_chart(variants: Sequence[Variant]) -> str:
    """Per-block sparsity, one line per variant; the allocation picks the line style."""
    profiles = [{"label": v.label, "x": list(range(len(v.per_block))), "y": v.per_block,
                 "linestyle": ALLOCATION_STYLE.get(v.allocation or "", OTHER_STYLE)[0],
                 "marker": ALLOCATION_STYLE.get(v.allocation or "", OTHER_STYLE)[1]}
                for v in variants if v.per_block]
    return svg_markup(line_chart(profiles, title="Per-block sparsity of each variant", xlabel="block (layer)",
                                 ylabel="achieved sparsity", integer_x=True))


def _x_sparsity(v: Variant) -> float | None:
    return v.sparsity if v.sparsity is not None else v.target_sparsity


def _ppl_chart(variants: Sequence[Variant]) -> str:
    """Perplexity vs achieved sparsity, one line per method/allocation, the dense baseline dashed."""
    groups: dict[str, list[Variant]] = {}
    for v in variants:
        if v.ppl is not None and _x_sparsity(v) is not None:
            groups.setdefault(_series_key(v), []).append(v)
    series = []
    for key in sorted(groups):
        pts = sorted(groups[key], key=_x_sparsity)
        series.append({"label": key, "x": [_x_sparsity(v) for v in pts], "y": [v.ppl for v in pts]})
    dense = sorted(v.dense_ppl for v in variants if v.dense_ppl is not None)
    hlines = [(dense[len(dense) // 2], "dense baseline")] if dense else []
    ppls = [v.ppl for v in variants if v.ppl] + [d for d, _ in hlines]
    log_y = bool(ppls) and min(ppls) > 0 and max(ppls) / min(ppls) > 4
    return svg_markup(line_chart(series, title="Perplexity vs sparsity per allocation", xlabel="achieved sparsity",
                                 ylabel="perplexity", log_y=log_y, hlines=hlines))


def _cell(col: str, cell: str) -> str:
    if col == "aliases" and cell != "-":
        cell_html = "".join(f'<span class="badge{" champion" if a == CHAMPION_ALIAS else ""}">{html.escape(a)}</span>'
                            for a in cell.split(","))
    else:
        cell_html = html.escape(cell)
    return f'<td class="num">{cell_html}</td>' if col in _NUMERIC_COLS else f"<td>{cell_html}</td>"


def _metrics_table(variants: Sequence[Variant]) -> str:
    head = "".join(f'<th class="num">{html.escape(c)}</th>' if c in _NUMERIC_COLS else f"<th>{html.escape(c)}</th>"
                   for c in TABLE_COLUMNS)
    body = []
    for r in table_rows(variants):
        cls = ' class="champion"' if CHAMPION_ALIAS in r[1].split(",") else ""
        body.append(f"<tr{cls}>{''.join(_cell(col, cell) for col, cell in zip(TABLE_COLUMNS, r))}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _zero_shot_section(variants: Sequence[Variant]) -> str:
    """Accuracy per task and version; empty when no variant was evaluated zero-shot."""
    tasks = sorted({t for v in variants for t in v.zero_shot_tasks})
    if not tasks:
        return ""

    def num(x: float | None) -> str:
        return f'<td class="num">{x:.4f}</td>' if x is not None else "<td>-</td>"

    head = "".join(f'<th class="num">{html.escape(t)}</th>' for t in ["version", *tasks, "mean"])
    rows = "".join(f'<tr><td class="num">{v.version}</td>' + "".join(num(v.zero_shot_tasks.get(t)) for t in tasks)
                   + num(v.zero_shot) + "</tr>"
                   for v in sorted(variants, key=lambda x: -x.version) if v.zero_shot_tasks)
    return (f'<h2>Zero-shot accuracy per task</h2><div class="card"><table class="narrow"><thead><tr>{head}</tr>'
            f"</thead><tbody>{rows}</tbody></table></div>")


def _meta_line(variants: Sequence[Variant], when: str, tracking_uri: str | None) -> str:
    esc = html.escape
    champion = next((v for v in variants if CHAMPION_ALIAS in v.aliases), None)
    base_models = sorted({v.base_model for v in variants if v.base_model})
    meta = [f"{len(variants)} version(s)", f"generated {esc(when)}"]
    if base_models:
        meta.append("base " + ", ".join(f"<code>{esc(b)}</code>" for b in base_models[:3]))
    if champion:
        meta.append(f"champion <b>v{champion.version}</b>")
    if tracking_uri:
        meta.append(f"registry <code>{esc(tracking_uri)}</code>")
    return " &middot; ".join(meta)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>DLP report: {name}</title><style>{css}</style></head>
<body>
<h1>DLP compression report: {name}</h1>
<div class="meta">{meta}</div>
<h2>Per-block sparsity profiles</h2>
<div class="card">{profiles}<div class="note">Achieved sparsity of each transformer block (layer); DLP and OWL
allocate non-uniform sparsity (solid: DLP, dotted: OWL), uniform is flat (dashed).</div></div>
<h2>Perplexity vs sparsity</h2>
<div class="card">{ppl}<div class="note">Pruned perplexity against achieved overall sparsity, one line per
method/allocation (recovered variants, "+ LoRA", a line of their own); the dashed line is the dense model.</div></div>
<h2>Metrics</h2>
<div class="card">{table}<div class="note">ratio = pruned / dense perplexity; zs drop = dense minus pruned zero-shot
mean accuracy; recovered = LoRA recovery fine-tuned after pruning (with the perplexity before it); newest version
first.</div></div>
{zero_shot}
</body></html>
"""


def render_html(name: str, variants: Sequence[Variant], *, tracking_uri: str | None = None,
                generated_at: str | None = None) -> str:
    """The report page for ``variants`` of registered model ``name``."""
    when = generated_at or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return PAGE.format(name=html.escape(name), css=CSS, meta=_meta_line(variants, when, tracking_uri),
                       profiles=_profiles_chart(variants), ppl=_ppl_chart(variants), table=_metrics_table(variants),
                       zero_shot=_zero_shot_section(variants))


# ============================================================================================ publish
def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "model"


def log_report_to_mlflow(name: str, html_path: Path, variants: Sequence[Variant], client: "MlflowClient") -> dict[str, str]:
    """Log the page into the report run of ``name`` (created once, reused); tag the registered model."""
    exp_id = None
    for v in sorted(variants, key=lambda x: -x.version):
        if v.run_id:
            try:
                exp_id = client.get_run(v.run_id).info.experiment_id
                break
            except Exception:
                continue
    if exp_id is None:
        exp_id = reg.ensure_experiment(reg.DEFAULT_EXPERIMENT, tracking_uri=getattr(client, "_tracking_uri", None))
    runs = client.search_runs([exp_id], filter_string=f"tags.`{REPORT_TAG}` = {reg._quote(name)}", max_results=1,
                              order_by=["attributes.start_time DESC"])
    if runs:
        run_id = runs[0].info.run_id
    else:
        run_id = client.create_run(exp_id, run_name=f"report {name}", tags={REPORT_TAG: name}).info.run_id
    with tempfile.TemporaryDirectory(prefix="dlp-report-") as tmp:
        target = Path(tmp) / f"{_slug(name)}.html"
        target.write_bytes(Path(html_path).read_bytes())
        client.log_artifact(run_id, str(target), artifact_path="report")
    client.log_metric(run_id, "report.versions", float(len(variants)))
    client.set_terminated(run_id, "FINISHED")
    artifact_uri = client.get_run(run_id).info.artifact_uri.rstrip("/") + f"/report/{_slug(name)}.html"
    try:
        client.set_registered_model_tag(name, "dlp.report_run_id", run_id)
        client.set_registered_model_tag(name, "dlp.report_uri", artifact_uri)
    except Exception:  # pragma: no cover - model deleted meanwhile
        pass
    return {"run_id": run_id, "artifact_uri": artifact_uri}


def publish_prefect_artifact(name: str, variants: Sequence[Variant], location: str) -> str | None:
    """Inside a Prefect flow/task run: a markdown artifact with the metrics table and the report location.
    Returns the artifact key, or None outside a run (or when Prefect is not importable)."""
    try:
        from prefect.artifacts import create_markdown_artifact
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:  # pragma: no cover
        return None
    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return None
    rows = table_rows(variants)
    md = [f"# DLP report: {name}", "", f"Full HTML report: `{location}`", "",
          "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    key = f"dlp-report-{_slug(name)}"
    create_markdown_artifact(markdown="\n".join(md), key=key, description=f"DLP comparison report of {name}")
    return key


def build_report(
    name: str,
    out: str | os.PathLike[str] | None = None,
    *,
    tracking_uri: str | None = None,
    workdir: str | os.PathLike[str] = ".dlp-work",
    log_to_mlflow: bool = True,
    prefect_artifact: bool = True,
    client: "MlflowClient | None" = None,
) -> dict[str, Any]:
    """Write the report of registered model ``name`` to ``out`` (default ``<workdir>/reports/<name>.html``),
    log it to MLflow and publish a Prefect artifact (when inside a run). Returns
    ``{"path", "versions", "mlflow_run_id", "artifact_uri", "prefect_artifact"}``.
    Raises :class:`pipeline.variants.PromotionError` when the model is unknown."""
    uri = reg.resolve_tracking_uri(tracking_uri, workdir)
    client = client or reg.get_client(uri, workdir)
    variants = load_variants(name, client=client)
    path = Path(out) if out else Path(workdir).expanduser().resolve() / "reports" / f"{_slug(name)}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    page = render_html(name, variants, tracking_uri=uri)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    result: dict[str, Any] = {"path": str(path.resolve()), "versions": len(variants), "mlflow_run_id": None,
                              "artifact_uri": None, "prefect_artifact": None}
    if log_to_mlflow:
        logged = log_report_to_mlflow(name, path, variants, client)
        result["mlflow_run_id"], result["artifact_uri"] = logged["run_id"], logged["artifact_uri"]
    if prefect_artifact:
        result["prefect_artifact"] = publish_prefect_artifact(name, variants, result["artifact_uri"] or result["path"])
    return result
