"""Folding trained LoRA adapters back into a pruned model, and counting the zeros it keeps.

- ``masked`` (default): ``W' = W + M * (scale * B @ A)`` with ``M = (W != 0)``, the pruned weight's non-zero
  mask: every pruned weight stays exactly zero. A kept weight whose sum would cancel to exactly 0.0 keeps its
  old value instead, so the count of zeros after the merge equals the pruned model's to the weight.
- ``none``: the adapter is not merged; the caller saves it (peft ``save_pretrained``) beside the unchanged
  pruned weights.
- ``plain``: peft's ``merge_and_unload`` adds the full dense update (densifies; kept for comparison).
"""
from __future__ import annotations

import torch
from torch import nn

from .decoder import find_decoder


def zero_counts(model: nn.Module) -> dict[str, int]:
    """Exactly-zero weights among the decoder blocks' linears (the prunable weights), per linear and in all."""
    layout = find_decoder(model)
    out: dict[str, int] = {}
    for i in range(layout.num_blocks):
        for name, linear in layout.linears(i).items():
            out[layout.param_name(i, name)] = int((linear.weight == 0).sum())
    return out


def prunable_weights(model: nn.Module) -> int:
    layout = find_decoder(model)
    return sum(l.weight.numel() for i in range(layout.num_blocks) for l in layout.linears(i).values())


@torch.no_grad()
def masked_merge_(peft_model) -> int:
    """Add each adapter's update to its base weight where the weight is non-zero; returns the linears merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        weight = module.get_base_layer().weight
        for adapter in module.active_adapters:
            delta = module.get_delta_weight(adapter).to(weight.dtype)
            kept = weight != 0
            summed = weight + delta
            summed = torch.where(summed == 0, weight, summed)
            weight.copy_(torch.where(kept, summed, weight))
            merged += 1
    return merged


def merge(peft_model, mode: str) -> nn.Module:
    """Return the plain transformers model after folding the adapters in as ``mode`` says (module docstring)."""
    if mode == "masked":
        masked_merge_(peft_model)
        return peft_model.unload()
    if mode == "plain":
        return peft_model.merge_and_unload()
    return peft_model.unload()
