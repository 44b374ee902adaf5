"""What a recovered variant adds to its MLflow run and registered version (see :mod:`pipeline.stages.register`):

- tags (run and version): ``dlp.recovered=true`` and each recovery setting as ``dlp.recovery.<name>``;
- metrics: ``recovery.ppl_before`` / ``ppl_after`` / ``ppl_reduction`` (fraction), ``recovery.sparsity_before``
  / ``sparsity_after`` / ``exact``, ``recovery.steps``, ``recovery.train_s`` (``time.recover_s`` comes with the
  other stages' times); the loss curve
  as the stepped metric ``recovery.loss`` (one value per optimizer step);
- artifacts: ``recovery/loss.png`` (the curve) and ``recovery/report.json`` (settings, data, curve, sparsity);
  with ``merge: none`` the unmerged adapter as ``adapter/`` beside the model (peft's layout: load the registered
  model, then ``peft.PeftModel.from_pretrained(model, <run>/adapter)``), tagged ``dlp.recovery.adapter_artifact``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.results import EvaluationResult, RecoverResult

__all__ = ["ADAPTER_ARTIFACT", "RECOVERED_TAG", "loss_plot", "recovery_documents", "recovery_lineage",
           "recovery_metrics", "recovery_series", "unmerged_adapter"]

RECOVERED_TAG = "dlp.recovered"
ADAPTER_ARTIFACT = "adapter"  # the run artifact holding a merge-none variant's adapter


def recovery_lineage(recover: RecoverResult) -> dict[str, Any]:
    """Lineage fields (tagged ``dlp.<field>`` on the run and the version)."""
    out: dict[str, Any] = {RECOVERED_TAG: "true", "recovery.key": recover.key}
    for name, value in recover.settings.items():
        if name != "save_every":
            out[f"recovery.{name}"] = ",".join(value) if isinstance(value, list) else value
    if recover.settings.get("merge") == "none":
        out["recovery.adapter_artifact"] = ADAPTER_ARTIFACT
    return out


def unmerged_adapter(checkpoint: Path) -> Path | None:
    """The saved adapter of a ``merge: none`` recovered checkpoint (None when the adapter was merged)."""
    from dlp.adapter_fold import ADAPTER_DIR

    folder = Path(checkpoint) / ADAPTER_DIR
    return folder if folder.is_dir() else None


def recovery_metrics(recover: RecoverResult, before: EvaluationResult | None,
                     after: EvaluationResult) -> dict[str, float]:
    """Scalar metrics of the recovery; ``sparsity.achieved`` is the recovered model's (what is registered)."""
    m: dict[str, float] = {
        "sparsity.achieved": float(recover.achieved_sparsity),
        "recovery.sparsity_before": float(recover.sparsity_before),
        "recovery.sparsity_after": float(recover.achieved_sparsity),
        "recovery.exact": 1.0 if recover.exact else 0.0,
        "recovery.steps": float(recover.steps),
        "recovery.train_s": float(recover.train_seconds),
    }
    if before is not None and before.ppl is not None:
        m["recovery.ppl_before"] = float(before.ppl)
    if after.ppl is not None:
        m["recovery.ppl_after"] = float(after.ppl)
        if "recovery.ppl_before" in m:
            m["recovery.ppl_reduction"] = 1.0 - m["recovery.ppl_after"] / m["recovery.ppl_before"]
    return m


def recovery_series(recover: RecoverResult) -> dict[str, list[float]]:
    """Stepped metrics: the training loss at each optimizer step."""
    return {"recovery.loss": [float(x) for x in recover.loss]}


def recovery_documents(recover: RecoverResult, before: EvaluationResult | None,
                       after: EvaluationResult) -> dict[str, Any]:
    return {"recovery/report.json": {
        "key": recover.key, "settings": recover.settings, "data": recover.data, "loss": recover.loss,
        "steps": recover.steps, "sparsity_before": recover.sparsity_before,
        "sparsity_after": recover.achieved_sparsity, "exact": recover.exact,
        "per_block_after": recover.achieved_per_block, "ppl_before": before.ppl if before else None,
        "ppl_after": after.ppl, "train_seconds": recover.train_seconds, "checkpoint_uri": recover.uri}}


def loss_plot(recover: RecoverResult, folder: Path) -> Path:
    """``folder/loss.png``: the training loss per optimizer step."""
    from pipeline.charts import line_chart

    folder.mkdir(parents=True, exist_ok=True)
    s = recover.settings
    label = f"LoRA r={s.get('rank')} lr={s.get('lr')} ({s.get('merge')} merge)"
    fig = line_chart([{"label": label, "x": list(range(1, len(recover.loss) + 1)), "y": recover.loss}],
                     title="Recovery fine-tuning: training loss", xlabel="optimizer step", ylabel="loss",
                     integer_x=True, size=(8.0, 3.6))
    path = folder / "loss.png"
    fig.savefig(path)
    return path
