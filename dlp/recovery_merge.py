"""The masked update that keeps a pruned model's zeros, for training and for merging.

- ``masked`` (default): ``W' = W + M * (scale * B @ A)`` with ``M = (W != 0)``, the pruned weight's non-zero
  mask: every pruned weight stays exactly zero. A kept weight whose sum would cancel to exactly 0.0 keeps its
  old value instead, so the count of zeros after the merge equals the pruned model's to the weight. The
  adapters are trained *mask-aware* (:func:`make_mask_aware`): each adapted linear computes with that same
  masked weight, so the merged model is the model that was trained -- a plain LoRA update merged through the
  mask would lose the ~70 % of it that falls on pruned positions.
- ``none``: plain LoRA training; the adapter is not merged and the caller saves it (peft ``save_pretrained``)
  beside the unchanged pruned weights (the Wanda/OWL recipe; inference computes ``W + B A``, dense).
- ``plain``: plain LoRA training, then peft's ``merge_and_unload`` adds the full update (densifies; kept for
  comparison).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import find_decoder


def _block_linears(model: nn.Module):
    """``(weight name, linear)`` of every decoder block's linears (the prunable weights)."""
    layout = find_decoder(model)
    for i in range(layout.num_blocks):
        for name, linear in layout.linears(i).items():
            yield layout.param_name(i, name), linear


def zero_counts(model: nn.Module) -> dict[str, int]:
    """Exactly-zero weights among the decoder blocks' linears (the prunable weights), per linear."""
    return {name: int((linear.weight == 0).sum()) for name, linear in _block_linears(model)}


def prunable_weights(model: nn.Module) -> int:
    layout = find_decoder(model)
    return sum(l.weight.numel() for i in range(layout.num_blocks) for l in layout.linears(i).values())


def block_sparsity(model: nn.Module) -> list[float]:
    """Fraction of exactly-zero weights among each decoder block's linears."""
    layout = find_decoder(model)
    out = []
    for i in range(layout.num_blocks):
        linears = list(layout.linears(i).values())
        zeros = sum(int((l.weight == 0).sum()) for l in linears)
        out.append(zeros / sum(l.weight.numel() for l in linears))
    return out


def masked_weight(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``W + M * delta`` with ``M = (W != 0)``; where the sum cancels to exactly 0.0, ``W`` is kept."""
    summed = weight + delta
    return torch.where((weight != 0) & (summed != 0), summed, weight)


def _lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    return [m for m in peft_model.modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def masked_merge_(peft_model) -> int:
    """Add each adapter's update to its base weight where the weight is non-zero; returns the linears merged."""
    merged = 0
    for module in _lora_layers(peft_model):
        weight = module.get_base_layer().weight
        for adapter in module.active_adapters:
            weight.copy_(masked_weight(weight, module.get_delta_weight(adapter).to(weight.dtype)))
            merged += 1
    return merged


def _mask_aware_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A LoRA linear's forward that computes with the masked weight (bound to each adapted layer)."""
    base = self.get_base_layer()
    if self.disable_adapters or self.merged:
        return base(x, *args, **kwargs)
    weight, extra = base.weight, None
    for adapter in self.active_adapters:
        if adapter not in self.lora_A:
            continue
        delta = self.get_delta_weight(adapter)
        dropout = self.lora_dropout[adapter]
        if not self.training or isinstance(dropout, nn.Identity):
            weight = masked_weight(weight, delta)  # exactly the weight the masked merge writes
        else:  # dropout on the adapter's input only, as in LoRA
            part = F.linear(dropout(x), torch.where(base.weight != 0, delta, torch.zeros_like(delta)))
            extra = part if extra is None else extra + part
    out = F.linear(x, weight, base.bias)
    return out if extra is None else out + extra


def make_mask_aware(peft_model) -> int:
    """Make every LoRA linear of ``peft_model`` train and infer through :func:`masked_weight`."""
    layers = _lora_layers(peft_model)
    for module in layers:
        module.forward = types.MethodType(_mask_aware_forward, module)
    return len(layers)


def merge(peft_model, mode: str) -> nn.Module:
    """Return the plain transformers model after folding the adapters in as ``mode`` says (module docstring)."""
    if mode == "masked":
        masked_merge_(peft_model)
        return peft_model.unload()
    if mode == "plain":
        return peft_model.merge_and_unload()
    return peft_model.unload()


def cast_keeping_support_(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast ``model`` (trained in float32) back to the checkpoint's ``dtype``. A non-zero weight of a block linear
    that the cast would round to exactly zero (float16 underflows below 6e-8) becomes the smallest value of its
    sign instead, so the set of zeros is the trained model's. Returns how many weights were moved that way."""
    moved = 0
    if dtype == torch.float32:
        return moved
    with torch.no_grad():
        for _, linear in _block_linears(model):
            w = linear.weight
            cast = w.to(dtype)
            lost = (cast == 0) & (w != 0)
            if lost.any():
                cast[lost] = torch.nextafter(torch.zeros_like(cast[lost]), torch.sign(w[lost]).to(dtype))
                moved += int(lost.sum())
            linear.weight.data = cast
    model.to(dtype)
    return moved
