"""Find the decoder of any Hugging Face decoder-only model by structure, not by name strings.

The decoder blocks are the longest ``nn.ModuleList`` whose entries all share one class and each hold
``nn.Linear`` layers (its length must match ``config.num_hidden_layers`` when the config states it).
The prunable sublayers of a block are its ``nn.Linear`` modules, in module order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import DLPError


@dataclass
class DecoderLayout:
    model: nn.Module
    blocks: nn.ModuleList
    blocks_path: str  # dotted path of the ModuleList inside the model, e.g. "model.layers"

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def embedding(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def linears(self, index: int) -> dict[str, nn.Linear]:
        return block_linears(self.blocks[index])

    def param_name(self, index: int, linear_name: str) -> str:
        """The state-dict name of a block linear's weight, e.g. ``model.layers.0.mlp.up_proj.weight``."""
        return f"{self.blocks_path}.{index}.{linear_name}.weight"


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def find_decoder(model: nn.Module) -> DecoderLayout:
    """Locate the ordered decoder blocks of ``model``; a clear error names an architecture that has none."""
    arch = type(model).__name__
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates: list[tuple[int, str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        if expected is not None and len(module) != expected:
            continue
        candidates.append((len(module), name, module))
    if not candidates:
        raise DLPError(
            f"unsupported architecture {arch}: found no list of identical decoder blocks with nn.Linear "
            f"layers; DLP supports decoder-only models such as Llama, Mistral, Qwen2, Gemma, Phi-3, OPT, GPT-NeoX"
        )
    candidates.sort(key=lambda c: (-c[0], c[1].count(".")))
    _, path, blocks = candidates[0]
    if model.get_input_embeddings() is None:
        raise DLPError(f"unsupported architecture {arch}: the model exposes no input embedding")
    return DecoderLayout(model=model, blocks=blocks, blocks_path=path)


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
