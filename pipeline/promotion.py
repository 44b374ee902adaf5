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

Variants (what a version's run says) are :mod:`pipeline.variants`; mlflow is imported lazily.
"""

from __future__ import annotations

import getpass
import json
import math
import operator
import os
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pipeline import registry as reg
from pipeline.variants import (  # noqa: F401 (re-exported: the promotion API reads variants)
    CHAMPION_ALIAS,
    PromotionError,
    Variant,
    format_table,
    load_variants,
    registered_aliases,
)

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


def _candidates(client: "MlflowClient", name: str, versions: Sequence[int] | None) -> list[Variant]:
    variants = load_variants(name, client=client)
    if versions:
        wanted = {int(v) for v in versions}
        missing = wanted - {v.version for v in variants}
        if missing:
            raise PromotionError(f"{name}: no version(s) {', '.join(map(str, sorted(missing)))}")
        variants = [v for v in variants if v.version in wanted]
    if not variants:
        raise PromotionError(f"registered model '{name}' has no versions to promote")
    return variants


def _holder(client: "MlflowClient", name: str, alias: str, variants: Sequence[Variant]) -> int | None:
    """The version holding ``alias`` now (it may be outside the candidates)."""
    held = next((v.version for v in variants if alias in v.aliases), None)
    if held is None:
        held = next((int(ver) for ver, al in registered_aliases(client, name).items() if alias in al), None)
    return held


def _move_alias(client: "MlflowClient", result: "PromotionResult") -> None:
    """Point the alias at the new version, tag who/when/why on it and on the version that lost it."""
    name, alias, ver, previous = result.name, result.alias, str(result.version), result.previous
    client.set_registered_model_alias(name, alias, ver)
    for key, value in {
        "dlp.promotion_alias": alias,
        "dlp.promoted_by": result.by,
        "dlp.promoted_at": result.at,
        "dlp.promotion_reason": result.reason[:5000],
        "dlp.promotion_gate": result.gate,
        "dlp.promotion_metrics": json.dumps({k: v for k, v in result.metrics.items() if v is not None}),
        "dlp.promotion_previous": str(previous) if previous is not None else "",
    }.items():
        client.set_model_version_tag(name, ver, key, value)
    if previous is not None:
        try:
            client.set_model_version_tag(name, str(previous), "dlp.demoted_at", result.at)
            client.set_model_version_tag(name, str(previous), "dlp.demoted_for", f"{alias} -> v{ver} by {result.by}")
        except Exception:  # the old version was deleted meanwhile
            pass
    _append_history(client, name, {"alias": alias, "version": result.version, "previous": previous, "by": result.by,
                                   "at": result.at, "gate": result.gate, "reason": result.reason[:300]})


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
    variants = _candidates(client, name, versions)
    passing, failures = evaluate_gate(variants, conditions)
    previous = _holder(client, name, alias, variants)
    if not passing:
        raise PromotionError(
            f"no version of '{name}' passes the gate {gate_text} ({len(variants)} checked): {describe_failures(failures)}"
        )
    best = passing[0]
    metrics = {m: best.gate_value(m) for m in GATE_METRICS}
    why = reason or (f"best of {len(passing)} passing version(s) under gate {gate_text}: "
                     + ", ".join(f"{m}={val:.4g}" for m, val in metrics.items() if val is not None))
    if dry_run or previous == best.version:
        return PromotionResult(name, alias, best.version, previous, False, gate_text, why, None, None, metrics,
                               failures, dry_run=dry_run)
    result = PromotionResult(name, alias, best.version, previous, True, gate_text, why, by or _who(),
                             datetime.now(timezone.utc).isoformat(timespec="seconds"), metrics, failures)
    _move_alias(client, result)
    return result


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
