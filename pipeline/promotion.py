"""Promotion of registered DLP variants: read each version's metrics, gate them, move the ``champion`` alias.

Metrics of a version come from its MLflow run (the variant run :func:`pipeline.registry.log_variant_run` creates)
and its lineage tags (``dlp.method``, ``dlp.allocation``, ``dlp.sparsity`` ...). Gate metrics are relative to
the dense baseline logged in the same run:

==================  ==============================================================  ==========
gate name           meaning                                                          direction
==================  ==============================================================  ==========
``ppl_ratio``       pruned perplexity / dense perplexity                             lower
``ppl``             pruned perplexity                                                 lower
``zero_shot_drop``  dense zero-shot mean accuracy - pruned mean (0.05 = 5 points)    lower
``zero_shot``       pruned zero-shot mean accuracy                                    higher
``sparsity``        achieved overall sparsity                                         higher
==================  ==============================================================  ==========

A gate is ``"ppl_ratio<=1.5,zero_shot_drop<=0.05,sparsity>=0.6"`` (operators ``<= < >= > ==``). A version with
a gated metric missing (e.g. no zero-shot evaluation) fails that condition. Among the versions that pass, the
best is the lowest ``ppl_ratio`` (else pruned ``ppl``), then the lowest ``zero_shot_drop``, then the highest
``sparsity``, then the newest version.

:func:`promote` moves the alias and records who/when/why as version tags (``dlp.promoted_by``,
``dlp.promoted_at``, ``dlp.promotion_reason``, ``dlp.promotion_gate``, ``dlp.promotion_alias``,
``dlp.promotion_metrics``) and appends to the registered model's ``dlp.promotion_history`` tag; the version
that loses the alias gets ``dlp.demoted_at`` / ``dlp.demoted_for``. :func:`auto_promote` is the same for the
end of a pipeline run: it never raises when nothing passes.

mlflow is imported lazily (through :mod:`pipeline.registry`).
"""

from __future__ import annotations

import getpass
import json
import math
import operator
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pipeline import registry as reg

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

__all__ = [
    "CHAMPION_ALIAS",
    "GATE_METRICS",
    "Condition",
    "PromotionError",
    "PromotionResult",
    "Variant",
    "auto_promote",
    "evaluate_gate",
    "format_table",
    "load_variants",
    "parse_gate",
    "promote",
]

CHAMPION_ALIAS = "champion"
HISTORY_TAG = "dlp.promotion_history"
HISTORY_KEEP = 50

#: gate metric -> (description, "lower"/"higher" is better)
GATE_METRICS: dict[str, tuple[str, str]] = {
    "ppl_ratio": ("pruned perplexity / dense perplexity", "lower"),
    "ppl": ("pruned perplexity", "lower"),
    "zero_shot_drop": ("dense minus pruned zero-shot mean accuracy", "lower"),
    "zero_shot": ("pruned zero-shot mean accuracy", "higher"),
    "sparsity": ("achieved overall sparsity", "higher"),
}

# Where each value is found in the variant run's metrics, first match wins. The pipeline
# (tasks/register.py: variant_metrics) logs the names listed first; the others keep hand-made runs readable.
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


# ============================================================================================ gate
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": lambda a, b: math.isclose(a, b),
}
_COND_RX = re.compile(r"^\s*([A-Za-z_][\w]*)\s*(<=|>=|==|<|>|=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(%?)\s*$")


@dataclass(frozen=True)
class Condition:
    metric: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"

    def check(self, value: float | None) -> tuple[bool, str]:
        if value is None:
            return False, f"{self.metric} unavailable"
        tol = 1e-9 * max(1.0, abs(self.threshold))  # 0.6 achieved as 0.59999999999 still passes >= 0.6
        if self.op == "<=":
            ok = value <= self.threshold + tol
        elif self.op == ">=":
            ok = value >= self.threshold - tol
        else:
            ok = _OPS[self.op](value, self.threshold)
        neg = {"<=": ">", ">=": "<", "<": ">=", ">": "<=", "==": "!="}[self.op]
        shown = f"{value:.4g}"
        if shown == f"{self.threshold:.4g}":  # show enough digits to see why it failed
            shown = f"{value:.10g}"
        return ok, f"{self.metric}={shown} {self.op if ok else neg} {self.threshold:g}"


def parse_gate(text: str) -> list[Condition]:
    """``"ppl_ratio<=1.5, zero_shot_drop<=0.05, sparsity>=0.6"`` -> conditions (PromotionError on bad input)."""
    if not text or not text.strip():
        raise PromotionError("empty gate: give conditions such as 'ppl_ratio<=1.5,sparsity>=0.6'")
    conds = []
    for part in [p for p in re.split(r"[,;]", text) if p.strip()]:
        m = _COND_RX.match(part)
        if not m:
            raise PromotionError(f"gate condition '{part.strip()}': expected METRIC<=NUMBER (or >=, <, >, ==), e.g. ppl_ratio<=1.5")
        metric, op, num, pct = m.groups()
        if metric not in GATE_METRICS:
            raise PromotionError(f"gate condition '{part.strip()}': unknown metric '{metric}' (valid: {', '.join(GATE_METRICS)})")
        value = float(num) / (100.0 if pct else 1.0)
        conds.append(Condition(metric, "==" if op == "=" else op, value))
    return conds


def evaluate_gate(variants: Sequence[Variant], conditions: Sequence[Condition]) -> tuple[list[Variant], dict[int, list[str]]]:
    """(passing variants best first, {version: [failure descriptions]} for the others)."""
    passing, failures = [], {}
    for v in variants:
        bad = [msg for c in conditions for ok, msg in [c.check(v.gate_value(c.metric))] if not ok]
        if bad:
            failures[v.version] = bad
        else:
            passing.append(v)
    return sorted(passing, key=_rank_key), failures


def _rank_key(v: Variant) -> tuple:
    inf = float("inf")
    quality = v.ppl_ratio if v.ppl_ratio is not None else (v.ppl if v.ppl is not None else inf)
    return (quality, v.zero_shot_drop if v.zero_shot_drop is not None else inf,
            -(v.sparsity if v.sparsity is not None else -inf), -v.version)


# ============================================================================================ promote
@dataclass
class PromotionResult:
    name: str
    alias: str
    version: int | None  # the promoted version (None: nothing passed, auto_promote only)
    previous: int | None  # who held the alias before
    changed: bool  # False when the best version already held the alias, or on a dry run
    gate: str
    reason: str
    by: str | None
    at: str | None
    metrics: dict[str, Any]
    failures: dict[int, list[str]]
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = {str(k): v for k, v in self.failures.items()}
        return d


def _who() -> str:
    for var in ("DLP_PROMOTED_BY", "USER", "LOGNAME"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers)
        return "unknown"


def describe_failures(failures: dict[int, list[str]], limit: int = 6) -> str:
    items = sorted(failures.items(), reverse=True)
    text = "; ".join(f"v{ver}: {', '.join(msgs)}" for ver, msgs in items[:limit])
    if len(items) > limit:
        text += f"; and {len(items) - limit} more version(s)"
    return text


def promote(
    name: str,
    gate: str | Sequence[Condition],
    *,
    alias: str = CHAMPION_ALIAS,
    reason: str | None = None,
    by: str | None = None,
    dry_run: bool = False,
    versions: Sequence[int] | None = None,
    client: "MlflowClient | None" = None,
    tracking_uri: str | None = None,
    workdir: str | os.PathLike[str] = ".dlp-work",
) -> PromotionResult:
    """Move ``alias`` to the best version of ``name`` passing ``gate``.

    ``versions`` restricts the candidates. Raises PromotionError naming what failed, per version, when none
    passes. Idempotent: when the best version already holds the alias nothing is written (``changed=False``)."""
    conditions = parse_gate(gate) if isinstance(gate, str) else list(gate)
    gate_text = ",".join(str(c) for c in conditions)
    if not re.fullmatch(r"[A-Za-z][\w-]*", alias):
        raise PromotionError(f"alias '{alias}': use letters, digits, '_' or '-' (e.g. champion)")
    client = client or reg.get_client(tracking_uri, workdir)
    variants = load_variants(name, client=client)
    if versions:
        wanted = {int(v) for v in versions}
        missing = wanted - {v.version for v in variants}
        if missing:
            raise PromotionError(f"{name}: no version(s) {', '.join(map(str, sorted(missing)))}")
        variants = [v for v in variants if v.version in wanted]
    if not variants:
        raise PromotionError(f"registered model '{name}' has no versions to promote")
    passing, failures = evaluate_gate(variants, conditions)
    previous = next((v.version for v in variants if alias in v.aliases), None)
    if previous is None:
        prev_map = registered_aliases(client, name)
        previous = next((int(ver) for ver, al in prev_map.items() if alias in al), None)
    if not passing:
        raise PromotionError(
            f"no version of '{name}' passes the gate {gate_text} ({len(variants)} checked): {describe_failures(failures)}"
        )
    best = passing[0]
    metrics = {m: best.gate_value(m) for m in GATE_METRICS}
    auto_reason = f"best of {len(passing)} passing version(s) under gate {gate_text}: " + ", ".join(
        f"{m}={val:.4g}" for m, val in metrics.items() if val is not None)
    why = reason or auto_reason
    if dry_run or previous == best.version:
        return PromotionResult(name, alias, best.version, previous, False, gate_text, why, None, None, metrics,
                               failures, dry_run=dry_run)
    who = by or _who()
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    ver = str(best.version)
    client.set_registered_model_alias(name, alias, ver)
    for key, value in {
        "dlp.promotion_alias": alias,
        "dlp.promoted_by": who,
        "dlp.promoted_at": when,
        "dlp.promotion_reason": why[:5000],
        "dlp.promotion_gate": gate_text,
        "dlp.promotion_metrics": json.dumps({k: v for k, v in metrics.items() if v is not None}),
        "dlp.promotion_previous": str(previous) if previous is not None else "",
    }.items():
        client.set_model_version_tag(name, ver, key, value)
    if previous is not None:
        try:
            client.set_model_version_tag(name, str(previous), "dlp.demoted_at", when)
            client.set_model_version_tag(name, str(previous), "dlp.demoted_for", f"{alias} -> v{ver} by {who}")
        except Exception:  # the old version was deleted meanwhile
            pass
    _append_history(client, name, {"alias": alias, "version": best.version, "previous": previous, "by": who,
                                   "at": when, "gate": gate_text, "reason": why[:300]})
    return PromotionResult(name, alias, best.version, previous, True, gate_text, why, who, when, metrics, failures)


def _append_history(client: "MlflowClient", name: str, entry: dict[str, Any]) -> None:
    try:
        tags = client.get_registered_model(name).tags or {}
        history = json.loads(tags.get(HISTORY_TAG, "[]"))
        if not isinstance(history, list):
            history = []
    except Exception:
        history = []
    history.append(entry)
    blob = json.dumps(history[-HISTORY_KEEP:])
    while len(blob) > 7500 and len(history) > 1:  # stay under MLflow's tag value limit
        history = history[1:]
        blob = json.dumps(history[-HISTORY_KEEP:])
    client.set_registered_model_tag(name, HISTORY_TAG, blob)


def auto_promote(
    name: str,
    gate: str | None,
    *,
    alias: str = CHAMPION_ALIAS,
    by: str = "pipeline",
    reason: str | None = None,
    tracking_uri: str | None = None,
    workdir: str | os.PathLike[str] = ".dlp-work",
    client: "MlflowClient | None" = None,
) -> PromotionResult | None:
    """Gate step for the end of a pipeline run: promote when some version passes, else return a result with
    ``version=None`` and the failures (never raises for a failing gate; a bad gate string still raises).
    Returns None when ``gate`` is empty (no automatic promotion configured)."""
    if not gate:
        return None
    conditions = parse_gate(gate)
    try:
        return promote(name, conditions, alias=alias, by=by, reason=reason, client=client,
                       tracking_uri=tracking_uri, workdir=workdir)
    except PromotionError as e:
        if "passes the gate" not in str(e):
            raise
        client = client or reg.get_client(tracking_uri, workdir)
        variants = load_variants(name, client=client)
        _, failures = evaluate_gate(variants, conditions)
        previous = next((v.version for v in variants if alias in v.aliases), None)
        return PromotionResult(name, alias, None, previous, False, ",".join(map(str, conditions)), str(e), by, None,
                               {}, failures)


# ============================================================================================ table
def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


TABLE_COLUMNS = ("version", "aliases", "method", "allocation", "target", "sparsity", "ppl", "dense ppl", "ratio",
                 "zero-shot", "zs drop", "base rev", "created")


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
            _fmt(v.zero_shot, ".4f"), _fmt(v.zero_shot_drop, "+.4f"), (v.base_revision or "-")[:12], created,
        ])
    return rows


def format_table(variants: Sequence[Variant]) -> str:
    """Plain-text table, newest version first."""
    rows = table_rows(variants)
    header = list(TABLE_COLUMNS)
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(len(header))]
    numeric = {0, 4, 5, 6, 7, 8, 9, 10}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(widths[i]) if i in numeric else c.ljust(widths[i]) for i, c in enumerate(cells)).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)
