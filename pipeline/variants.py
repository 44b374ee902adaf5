"""Registered DLP variants as the ops commands see them: one :class:`Variant` per model version, built from its
MLflow run's metrics and its lineage tags, and the model table (``dlp models``, the report).

mlflow is imported lazily (through :mod:`pipeline.registry`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence

from pipeline import registry as reg

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

__all__ = ["CHAMPION_ALIAS", "PromotionError", "TABLE_COLUMNS", "Variant", "format_table", "load_variants",
           "registered_aliases", "table_rows", "variant_from"]

CHAMPION_ALIAS = "champion"

# Where each value is found in the variant run's metrics, first match wins. The pipeline
# (pipeline/stages/register.py: variant_metrics) logs the names listed first; the others keep hand-made runs readable.
PRUNED_PPL_KEYS = ("ppl.pruned", "pruned_ppl", "ppl")
DENSE_PPL_KEYS = ("ppl.dense", "dense_ppl")
PPL_RATIO_KEYS = ("ppl.ratio", "ppl_ratio")
SPARSITY_KEYS = ("sparsity.achieved", "achieved_sparsity", "sparsity.block_mean")
TARGET_SPARSITY_KEYS = ("sparsity.target", "target_sparsity")
ZS_KEYS = ("zeroshot.mean_acc", "zero_shot.mean_acc")
ZS_DELTA_KEYS = ("zeroshot.mean_acc_delta", "zero_shot.mean_acc_delta")  # pruned - dense (negative = a drop)
DENSE_ZS_KEYS = ("zeroshot.mean_acc_dense", "zero_shot.mean_acc_dense")
_TASK_ACC_RX = re.compile(r"^zero_?shot\.([^.]+)\.acc$")
_BLOCK_RX = re.compile(r"^sparsity\.block_(\d+)$")
_TARGET_BLOCK_RX = re.compile(r"^target_sparsity\.block_(\d+)$")


class PromotionError(ValueError):
    """A bad gate, a missing model, or no version passing the gate. ``str()`` is one line."""


# ============================================================================================ variants
@dataclass
class Variant:
    """What the ops commands need to know about one registered version."""

    name: str
    version: int
    run_id: str | None
    aliases: list[str] = field(default_factory=list)
    method: str | None = None
    allocation: str | None = None
    statistic: str | None = None
    alpha: str | None = None
    pattern: str | None = None
    target_sparsity: float | None = None
    sparsity: float | None = None
    ppl: float | None = None
    dense_ppl: float | None = None
    ppl_ratio: float | None = None
    zero_shot: float | None = None
    dense_zero_shot: float | None = None
    zero_shot_drop: float | None = None
    zero_shot_tasks: dict[str, float] = field(default_factory=dict)
    per_block: list[float] = field(default_factory=list)
    per_block_target: list[float] = field(default_factory=list)
    base_model: str | None = None
    base_revision: str | None = None
    created: float | None = None  # epoch seconds
    variant_key: str | None = None
    run_name: str | None = None
    recovered: bool = False  # LoRA recovery fine-tuned after pruning (tag dlp.recovered)
    ppl_before_recovery: float | None = None
    storage: str | None = None  # masks | dense (pipeline.mask_registry); None for versions logged before
    bytes_stored: int | None = None  # bytes of the logged variant
    bytes_dense: int | None = None  # bytes of its dense folder
    tags: dict[str, str] = field(default_factory=dict)

    def gate_value(self, metric: str) -> float | None:
        return getattr(self, metric)

    @property
    def label(self) -> str:
        parts = [p for p in (self.method, self.allocation) if p]
        if self.allocation == "dlp" and self.alpha:
            parts.append(f"a{self.alpha}")
        sp = self.target_sparsity if self.target_sparsity is not None else self.sparsity
        if sp is not None:
            parts.append(f"{sp:.0%}")
        if self.recovered:
            parts.append("lora")
        return f"v{self.version} " + ("-".join(parts) if parts else (self.run_name or ""))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("tags", None)
        return d


def _first(metrics: dict[str, float], keys: Sequence[str]) -> float | None:
    for k in keys:
        v = metrics.get(k)
        if v is not None and math.isfinite(float(v)):
            return float(v)
    return None


def _to_float(text: Any) -> float | None:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _to_int(text: Any) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def _indexed(metrics: dict[str, float], rx: re.Pattern[str]) -> list[float]:
    found = sorted((int(m.group(1)), float(v)) for k, v in metrics.items() if (m := rx.match(k)))
    return [v for _, v in found]


def variant_from(mv: Any, run: Any | None, aliases: Sequence[str] = ()) -> Variant:
    """Build a :class:`Variant` from a ModelVersion and its run (either may lack fields)."""
    tags = dict(mv.tags or {})
    metrics: dict[str, float] = dict(run.data.metrics) if run is not None else {}
    run_tags = dict(run.data.tags) if run is not None else {}
    for k, v in run_tags.items():
        tags.setdefault(k, v)

    def tag(name: str) -> str | None:
        return tags.get(f"dlp.{name}")

    v = Variant(name=mv.name, version=int(mv.version), run_id=mv.run_id, aliases=sorted(aliases))
    v.method, v.allocation, v.statistic, v.pattern = tag("method"), tag("allocation"), tag("statistic"), tag("pattern")
    v.alpha = tag("alpha")
    v.base_model, v.base_revision, v.variant_key = tag("base_model"), tag("base_revision"), tags.get(reg.VARIANT_TAG)
    v.storage, v.bytes_stored, v.bytes_dense = tag("storage"), _to_int(tag("bytes_stored")), _to_int(tag("bytes_dense"))
    v.target_sparsity = _first(metrics, TARGET_SPARSITY_KEYS)
    if v.target_sparsity is None:
        v.target_sparsity = _to_float(tag("sparsity"))
    v.per_block = _indexed(metrics, _BLOCK_RX)
    v.per_block_target = _indexed(metrics, _TARGET_BLOCK_RX)
    v.sparsity = _first(metrics, SPARSITY_KEYS)
    v.ppl = _first(metrics, PRUNED_PPL_KEYS)
    v.dense_ppl = _first(metrics, DENSE_PPL_KEYS)
    v.ppl_ratio = _first(metrics, PPL_RATIO_KEYS)
    if v.ppl_ratio is None and v.ppl is not None and v.dense_ppl:
        v.ppl_ratio = v.ppl / v.dense_ppl
    v.zero_shot = _first(metrics, ZS_KEYS)
    v.dense_zero_shot = _first(metrics, DENSE_ZS_KEYS)
    delta = _first(metrics, ZS_DELTA_KEYS)
    if v.dense_zero_shot is None and delta is not None and v.zero_shot is not None:
        v.dense_zero_shot = v.zero_shot - delta
    if delta is not None:
        v.zero_shot_drop = -delta
    elif v.zero_shot is not None and v.dense_zero_shot is not None:
        v.zero_shot_drop = v.dense_zero_shot - v.zero_shot
    v.zero_shot_tasks = {m.group(1): float(val) for k, val in metrics.items()
                         if (m := _TASK_ACC_RX.match(k)) and m.group(1) not in ("mean", "dense", "pruned")}
    v.created = (mv.creation_timestamp or 0) / 1000.0 if getattr(mv, "creation_timestamp", None) else None
    v.run_name = run.info.run_name if run is not None else None
    v.recovered = tag("recovered") == "true"
    v.ppl_before_recovery = _first(metrics, ("recovery.ppl_before",))
    v.tags = tags
    return v


def registered_aliases(client: "MlflowClient", name: str) -> dict[str, list[str]]:
    """version -> aliases of a registered model."""
    rm = client.get_registered_model(name)
    out: dict[str, list[str]] = {}
    raw = getattr(rm, "aliases", None) or {}
    items = raw.items() if isinstance(raw, dict) else ((a.alias, a.version) for a in raw)
    for alias, version in items:
        out.setdefault(str(version), []).append(alias)
    return out


def _require_model(client: "MlflowClient", name: str) -> None:
    try:
        client.get_registered_model(name)
    except Exception:
        try:
            known = sorted(m.name for m in client.search_registered_models(max_results=50))
        except Exception:
            known = []
        hint = f" (registered models: {', '.join(known)})" if known else " (the registry has no models yet)"
        where = getattr(client, "_registry_uri", None) or "the registry"
        raise PromotionError(f"registered model '{name}' not found in {where}{hint}") from None


def load_variants(name: str, *, client: "MlflowClient | None" = None, tracking_uri: str | None = None,
                  workdir: str | os.PathLike[str] = ".dlp-work") -> list[Variant]:
    """All versions of ``name``, oldest first, with their metrics. PromotionError when the model is unknown."""
    client = client or reg.get_client(tracking_uri, workdir)
    _require_model(client, name)
    aliases = registered_aliases(client, name)
    versions = sorted(client.search_model_versions(f"name = {reg._quote(name)}"), key=lambda mv: int(mv.version))
    out = []
    for mv in versions:
        run = None
        if mv.run_id:
            try:
                run = client.get_run(mv.run_id)
            except Exception:  # run deleted: keep the version, without metrics
                run = None
        out.append(variant_from(mv, run, aliases.get(str(mv.version), [])))
    return out


# ============================================================================================ table
def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


TABLE_COLUMNS = ("version", "aliases", "method", "allocation", "target", "sparsity", "ppl", "dense ppl", "ratio",
                 "zero-shot", "zs drop", "stored", "of dense", "base rev", "created", "recovered")


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _stored(v: Variant) -> list[str]:
    """``stored`` (bytes of the logged variant folder, with its storage) and ``of dense`` (its share of the dense
    folder's bytes)."""
    if v.bytes_stored is None:
        return ["-", "-"]
    share = f"{v.bytes_stored / v.bytes_dense:.1%}" if v.bytes_dense else "-"
    return [f"{_mib(v.bytes_stored)} {v.storage or ''}".rstrip(), share]


def table_rows(variants: Sequence[Variant]) -> list[list[str]]:
    rows = []
    for v in sorted(variants, key=lambda x: -x.version):
        alloc = v.allocation or "-"
        if v.allocation == "dlp" and v.alpha:
            alloc += f" a={v.alpha}" + (f" {v.statistic}" if v.statistic else "")
        created = datetime.fromtimestamp(v.created, timezone.utc).strftime("%Y-%m-%d %H:%M") if v.created else "-"
        rows.append([
            str(v.version), ",".join(v.aliases) or "-", v.method or "-", alloc, _fmt(v.target_sparsity, ".3f"),
            _fmt(v.sparsity, ".4f"), _fmt(v.ppl, ".3f"), _fmt(v.dense_ppl, ".3f"), _fmt(v.ppl_ratio, ".3f"),
            _fmt(v.zero_shot, ".4f"), _fmt(v.zero_shot_drop, "+.4f"), *_stored(v), (v.base_revision or "-")[:12],
            created, _recovered_cell(v),
        ])
    return rows


def _recovered_cell(v: Variant) -> str:
    """``-``, or ``lora r8 (ppl 31.2 before)`` for a recovered variant."""
    if not v.recovered:
        return "-"
    rank = v.tags.get("dlp.recovery.rank")
    before = f" (ppl {v.ppl_before_recovery:.3f} before)" if v.ppl_before_recovery is not None else ""
    return "lora" + (f" r{rank}" if rank else "") + before


def format_table(variants: Sequence[Variant]) -> str:
    """Plain-text table, newest version first."""
    rows = table_rows(variants)
    header = list(TABLE_COLUMNS)
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(len(header))]
    numeric = {0, 4, 5, 6, 7, 8, 9, 10, 11, 12}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(widths[i]) if i in numeric else c.ljust(widths[i]) for i, c in enumerate(cells)).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)
