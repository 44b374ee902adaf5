"""Comparison report of a registered DLP model: one self-contained HTML page (inline SVG, inline CSS, no
external assets, no JavaScript) with

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
import math
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pipeline import registry as reg
from pipeline.promotion import CHAMPION_ALIAS, TABLE_COLUMNS, Variant, load_variants, table_rows

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

__all__ = ["build_report", "render_html", "svg_line_chart", "publish_prefect_artifact", "log_report_to_mlflow"]

REPORT_TAG = "dlp.report_for"
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
DASHES = ["", "6 3", "2 3", "8 3 2 3"]
MARKERS = ["circle", "square", "triangle", "diamond"]


# ============================================================================================ SVG
def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], start
    while t <= hi + step * 1e-6:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _log_ticks(lo: float, hi: float) -> list[float]:
    ticks = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10 ** e
            if lo <= v <= hi:
                ticks.append(float(v))
    return ticks or [lo, hi]


def _fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.3g}"
    return f"{v:.3f}".rstrip("0").rstrip(".")


def _marker(shape: str, x: float, y: float, color: str, title: str) -> str:
    t = f"<title>{html.escape(title)}</title>"
    if shape == "square":
        return f'<rect x="{x - 3.5:.1f}" y="{y - 3.5:.1f}" width="7" height="7" fill="{color}">{t}</rect>'
    if shape == "triangle":
        return (f'<polygon points="{x:.1f},{y - 4.5:.1f} {x - 4.2:.1f},{y + 3.2:.1f} {x + 4.2:.1f},{y + 3.2:.1f}" '
                f'fill="{color}">{t}</polygon>')
    if shape == "diamond":
        return (f'<polygon points="{x:.1f},{y - 4.5:.1f} {x + 4.5:.1f},{y:.1f} {x:.1f},{y + 4.5:.1f} {x - 4.5:.1f},{y:.1f}" '
                f'fill="{color}">{t}</polygon>')
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.6" fill="{color}">{t}</circle>'


def _svg_head(width: int, height: int, ml: int, title: str) -> str:
    esc = html.escape
    return (f'<svg xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {width} {height}" width="100%" '
            f'style="max-width:{width}px;height:auto" font-family="Helvetica, Arial, sans-serif" font-size="12">'
            f'<title>{esc(title)}</title><rect width="{width}" height="{height}" fill="#fff"/>'
            f'<text x="{ml}" y="20" font-size="14" font-weight="bold">{esc(title)}</text>')


def svg_line_chart(
    series: Sequence[dict[str, Any]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    width: int = 1100,
    height: int = 380,
    log_y: bool = False,
    integer_x: bool = False,
    hlines: Sequence[tuple[float, str]] = (),
) -> str:
    """An inline ``<svg>`` line chart. Each series: ``{"label", "x": [...], "y": [...], "color"?, "dash"?,
    "marker"?, "points": [tooltip, ...]?}``; None/non-finite y values are skipped (and break the line)."""
    legend_w = 230
    xs = [float(x) for s in series for x, y in zip(s["x"], s["y"]) if y is not None and math.isfinite(float(y))]
    ys = [float(y) for s in series for y in s["y"] if y is not None and math.isfinite(float(y))]
    ys += [v for v, _ in hlines if v is not None and math.isfinite(v)]
    if log_y:
        ys = [y for y in ys if y > 0]
    esc = html.escape
    mt, mb, mr = 36, 48, legend_w + 16
    if not xs or not ys:
        return (_svg_head(width, height, 64, title) + f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" '
                f'text-anchor="middle" fill="#777">no data</text></svg>')
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        pad = 0.5 if integer_x else max(0.05, 0.1 * abs(x0))
        x0, x1 = x0 - pad, x1 + pad
    else:
        pad = 0.0 if integer_x else 0.04 * (x1 - x0)
        x0, x1 = x0 - pad, x1 + pad
    if log_y:
        y0, y1 = min(ys) / 1.15, max(ys) * 1.15
    else:
        y0, y1 = min(ys), max(ys)
        pad = 0.08 * (y1 - y0) if y1 > y0 else max(0.05 * abs(y0), 0.01)
        y0, y1 = y0 - pad, y1 + pad
    yt = _log_ticks(y0, y1) if log_y else _nice_ticks(y0, y1, 7)
    ml = 34 + 7 * max([len(_fmt_tick(t)) for t in yt] or [3])  # room for the tick labels and the axis title
    pw, ph = width - ml - mr, height - mt - mb
    head = _svg_head(width, height, ml, title)

    def px(x: float) -> float:
        return ml + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        if log_y:
            return mt + ph - (math.log(y) - math.log(y0)) / (math.log(y1) - math.log(y0)) * ph
        return mt + ph - (y - y0) / (y1 - y0) * ph

    parts = [head]
    # grid + y ticks
    for t in yt:
        parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#e5e5e5"/>'
                     f'<text x="{ml - 6}" y="{py(t) + 4:.1f}" text-anchor="end" fill="#444">{_fmt_tick(t)}</text>')
    if integer_x:
        span = int(round(x1 - x0))
        step = max(1, math.ceil(span / 16))
        xt = [float(i) for i in range(math.ceil(x0), math.floor(x1) + 1, step)]
    else:
        xt = _nice_ticks(x0, x1, 6)
    for t in xt:
        parts.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{mt}" y2="{mt + ph}" stroke="#f0f0f0"/>'
                     f'<text x="{px(t):.1f}" y="{mt + ph + 16}" text-anchor="middle" fill="#444">'
                     f'{int(t) if integer_x else _fmt_tick(t)}</text>')
    parts.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    parts.append(f'<text x="{ml + pw / 2:.0f}" y="{height - 10}" text-anchor="middle">{esc(xlabel)}</text>')
    parts.append(f'<text transform="translate(16 {mt + ph / 2:.0f}) rotate(-90)" text-anchor="middle">'
                 f'{esc(ylabel)}{" (log scale)" if log_y else ""}</text>')
    # horizontal reference lines
    legend: list[str] = []
    for v, label in hlines:
        if v is None or not math.isfinite(v) or (log_y and v <= 0):
            continue
        parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#333" '
                     f'stroke-dasharray="4 4"><title>{esc(label)}: {v:.4g}</title></line>')
        legend.append(f'<line x1="0" x2="22" y1="0" y2="0" stroke="#333" stroke-dasharray="4 4"/>'
                      f'<text x="28" y="4">{esc(label)}</text>')
    # series
    for i, s in enumerate(series):
        color = s.get("color") or PALETTE[i % len(PALETTE)]
        dash = s.get("dash", DASHES[(i // len(PALETTE)) % len(DASHES)])
        shape = s.get("marker") or MARKERS[(i // len(PALETTE)) % len(MARKERS)]
        tips = s.get("points") or [None] * len(s["x"])
        segments: list[list[tuple[float, float]]] = [[]]
        markers = []
        for x, y, tip in zip(s["x"], s["y"], tips):
            if y is None or not math.isfinite(float(y)) or (log_y and float(y) <= 0):
                segments.append([])
                continue
            X, Y = px(float(x)), py(float(y))
            segments[-1].append((X, Y))
            markers.append(_marker(shape, X, Y, color, tip or f"{s['label']}: x={x:g}, y={float(y):.4g}"))
        for seg in segments:
            if len(seg) > 1:
                pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in seg)
                dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
                parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.8"{dash_attr}/>')
        if len(markers) <= 200:
            parts.extend(markers)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        label = s["label"] if len(s["label"]) <= 32 else s["label"][:31] + "…"
        legend.append(f'<line x1="0" x2="22" y1="0" y2="0" stroke="{color}" stroke-width="2"{dash_attr}/>'
                      + _marker(shape, 11, 0, color, s["label"]) + f'<text x="28" y="4">{esc(label)}</text>')
    lx, ly = ml + pw + 18, mt + 8
    for j, item in enumerate(legend[:24]):
        parts.append(f'<g transform="translate({lx} {ly + 18 * j})">{item}</g>')
    if len(legend) > 24:
        parts.append(f'<text x="{lx}" y="{ly + 18 * 24}" fill="#777">+{len(legend) - 24} more</text>')
    parts.append("</svg>")
    return "".join(parts)


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
_NUMERIC_COLS = {"version", "target", "sparsity", "ppl", "dense ppl", "ratio", "zero-shot", "zs drop"}


def _series_key(v: Variant) -> str:
    return "/".join(p for p in (v.method, v.allocation) if p) or "variant"


def render_html(name: str, variants: Sequence[Variant], *, tracking_uri: str | None = None,
                generated_at: str | None = None) -> str:
    """The report page for ``variants`` of registered model ``name``."""
    esc = html.escape
    when = generated_at or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    champion = next((v for v in variants if CHAMPION_ALIAS in v.aliases), None)

    # 1. per-block sparsity profiles
    styles = {"dlp": ("", "circle"), "owl": ("2 3", "triangle"), "uniform": ("6 3", "square")}
    profiles = [
        {"label": v.label, "x": list(range(len(v.per_block))), "y": v.per_block,
         "dash": styles.get(v.allocation or "", ("8 3 2 3", "diamond"))[0],
         "marker": styles.get(v.allocation or "", ("8 3 2 3", "diamond"))[1],
         "points": [f"{v.label}: block {i}: {s:.4f}" for i, s in enumerate(v.per_block)]}
        for v in variants if v.per_block
    ]
    chart1 = svg_line_chart(profiles, title="Per-block sparsity of each variant", xlabel="block (layer)",
                            ylabel="achieved sparsity", integer_x=True)

    # 2. perplexity vs sparsity per allocation
    groups: dict[str, list[Variant]] = {}
    for v in variants:
        if v.ppl is not None and (v.sparsity is not None or v.target_sparsity is not None):
            groups.setdefault(_series_key(v), []).append(v)
    series2 = []
    for key in sorted(groups):
        pts = sorted(groups[key], key=lambda v: (v.sparsity if v.sparsity is not None else v.target_sparsity))
        xs = [v.sparsity if v.sparsity is not None else v.target_sparsity for v in pts]
        series2.append({"label": key, "x": xs, "y": [v.ppl for v in pts],
                        "points": [f"v{v.version} {key}: sparsity {x:.4f}, ppl {v.ppl:.4g}" for v, x in zip(pts, xs)]})
    dense = sorted(v.dense_ppl for v in variants if v.dense_ppl is not None)
    hl = [(dense[len(dense) // 2], "dense baseline")] if dense else []
    ppls = [v.ppl for v in variants if v.ppl] + [d for d, _ in hl]
    log_y = bool(ppls) and min(ppls) > 0 and max(ppls) / min(ppls) > 4
    chart2 = svg_line_chart(series2, title="Perplexity vs sparsity per allocation", xlabel="achieved sparsity",
                            ylabel="perplexity", log_y=log_y, hlines=hl)

    # 3. metrics table
    rows = table_rows(variants)
    head = "".join(f'<th class="num">{esc(c)}</th>' if c in _NUMERIC_COLS else f"<th>{esc(c)}</th>" for c in TABLE_COLUMNS)
    body = []
    for r in rows:
        cls = ' class="champion"' if CHAMPION_ALIAS in r[1].split(",") else ""
        cells = []
        for col, cell in zip(TABLE_COLUMNS, r):
            if col == "aliases" and cell != "-":
                cell_html = "".join(f'<span class="badge{" champion" if a == CHAMPION_ALIAS else ""}">{esc(a)}</span>'
                                    for a in cell.split(","))
            else:
                cell_html = esc(cell)
            cells.append(f'<td class="num">{cell_html}</td>' if col in _NUMERIC_COLS else f"<td>{cell_html}</td>")
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"

    zs_tasks = sorted({t for v in variants for t in v.zero_shot_tasks})
    zs_table = ""
    if zs_tasks:
        zh = "".join(f'<th class="num">{esc(t)}</th>' for t in ["version", *zs_tasks, "mean"])
        zrows = "".join(
            "<tr>" + f'<td class="num">{v.version}</td>'
            + "".join(f'<td class="num">{v.zero_shot_tasks[t]:.4f}</td>' if t in v.zero_shot_tasks else "<td>-</td>"
                      for t in zs_tasks)
            + (f'<td class="num">{v.zero_shot:.4f}</td>' if v.zero_shot is not None else "<td>-</td>") + "</tr>"
            for v in sorted(variants, key=lambda x: -x.version) if v.zero_shot_tasks
        )
        zs_table = f'<h2>Zero-shot accuracy per task</h2><div class="card"><table class="narrow"><thead><tr>{zh}</tr></thead><tbody>{zrows}</tbody></table></div>'

    base_models = sorted({v.base_model for v in variants if v.base_model})
    meta = [f"{len(variants)} version(s)", f"generated {esc(when)}"]
    if base_models:
        meta.append("base " + ", ".join(f"<code>{esc(b)}</code>" for b in base_models[:3]))
    if champion:
        meta.append(f"champion <b>v{champion.version}</b>")
    if tracking_uri:
        meta.append(f"registry <code>{esc(tracking_uri)}</code>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>DLP report: {esc(name)}</title><style>{CSS}</style></head>
<body>
<h1>DLP compression report: {esc(name)}</h1>
<div class="meta">{" &middot; ".join(meta)}</div>
<h2>Per-block sparsity profiles</h2>
<div class="card">{chart1}<div class="note">Achieved sparsity of each transformer block (layer); DLP and OWL
allocate non-uniform sparsity (solid: DLP, dotted: OWL), uniform is flat (dashed). Hover a point for its value.</div></div>
<h2>Perplexity vs sparsity</h2>
<div class="card">{chart2}<div class="note">Pruned perplexity against achieved overall sparsity, one line per
method/allocation; the dashed line is the dense model.</div></div>
<h2>Metrics</h2>
<div class="card">{table}<div class="note">ratio = pruned / dense perplexity; zs drop = dense minus pruned zero-shot
mean accuracy; newest version first.</div></div>
{zs_table}
</body></html>
"""


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
    Raises :class:`pipeline.promotion.PromotionError` when the model is unknown."""
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
