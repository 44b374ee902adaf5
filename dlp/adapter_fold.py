"""Fold a saved LoRA adapter into a copy of its base checkpoint, one weights file at a time.

A recovery run with ``merge: none`` keeps the pruned weights unchanged and its adapter beside them
(``<checkpoint>/adapter/``, peft's ``save_pretrained`` layout). Inference through the unmerged adapter computes
``W x + scale * B (A x)``, the same function as a dense weight ``W + scale * B A``; :func:`fold_adapter` writes that
dense weight into a new folder so the block-by-block evaluation (which reads plain safetensors) evaluates what
the adapter serves. The copy is an evaluation view: it is dense where the adapter touched a linear, and the
stored variant stays the sparse checkpoint plus its adapter.

Only one weights file and the adapter's small matrices are in memory at a time; the product ``B A`` is formed in
float32 and added in float32 before the cast back to the checkpoint's dtype, as peft's own merge does.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import copy_side_files, staged_folder
from .errors import DLPError

ADAPTER_DIR = "adapter"  # where a recovered checkpoint keeps its unmerged adapter
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def adapter_scale(config: dict) -> float:
    """LoRA's scale of ``B A``: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). Per-module rank or alpha
    patterns are refused: recovery never writes them."""
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise DLPError("adapter has per-module rank/alpha patterns; fold it with peft's merge_and_unload instead")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r


def adapter_updates(adapter_dir: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """``{base weight name: (A, B)}`` of a saved adapter and its scale; names as the base checkpoint stores them."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise DLPError(f"{adapter_dir} is not a saved LoRA adapter (no {ADAPTER_CONFIG} / {ADAPTER_WEIGHTS})")
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, a in tensors.items():
        if not name.endswith(".lora_A.weight"):
            continue
        stem = name[: -len(".lora_A.weight")]
        b = tensors.get(f"{stem}.lora_B.weight")
        if b is None:
            raise DLPError(f"adapter {adapter_dir} has {name} but no lora_B beside it; the adapter is damaged")
        base = stem[len(_PEFT_PREFIX):] if stem.startswith(_PEFT_PREFIX) else stem
        pairs[f"{base}.weight"] = (a, b)
    if not pairs:
        raise DLPError(f"adapter {adapter_dir} holds no LoRA matrices")
    return pairs, adapter_scale(config)


def folded_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + scale * B A`` in float32, returned in ``W``'s dtype."""
    delta = (b.float() @ a.float()) * scale
    if delta.shape != weight.shape:
        raise DLPError(f"adapter update {tuple(delta.shape)} does not fit weight {tuple(weight.shape)}")
    return (weight.float() + delta).to(weight.dtype)


def fold_adapter(folder: str | Path, out: str | Path, adapter_dir: str | Path | None = None) -> Path:
    """Write ``folder``'s checkpoint with its adapter (``folder/adapter`` unless given) folded in to ``out``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder, out = Path(folder), Path(out)
    updates, scale = adapter_updates(adapter_dir or folder / ADAPTER_DIR)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise DLPError(f"{folder} has no .safetensors weights to fold the adapter into")
    with staged_folder(out) as tmp:
        folded = 0
        for path in files:  # one weights file in memory at a time
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata()
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            for name in tensors.keys() & updates.keys():
                tensors[name] = folded_weight(tensors[name], *updates[name], scale)
                folded += 1
            save_file(tensors, str(tmp / path.name), metadata=metadata)
            del tensors
        if folded != len(updates):
            raise DLPError(f"the adapter updates {len(updates)} weights but {folder} has {folded} of them; "
                           f"the adapter belongs to another model")
        copy_side_files(folder, tmp)
    return out
