"""Open a checkpoint for block-by-block work: the model as a meta-device skeleton plus its shard reader.

:func:`open_streamed` builds the model from its ``config.json`` under accelerate's ``init_empty_weights`` (no
weight memory; rotary tables and other non-persistent buffers are real), validates the safetensors layout
(:class:`dlp.checkpoint_reader.CheckpointReader`) and checks that every weight the model needs is in it, so a
bad checkpoint fails in a second, before any stage. The compute dtype defaults to the checkpoint's own
(``config.json``'s dtype, bf16 for most releases); accumulators (input norms, Hessians) are float32 regardless.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint_reader import CheckpointReader
from .decoder import DecoderLayout, find_decoder
from .errors import DLPError
from .models import DTYPES, MODEL_BUILD_LOCK, ModelRef, config_dtype
from .weights import StreamedWeights


@dataclass
class StreamedModel:
    """A skeleton model whose weights stay in their checkpoint until a block is needed."""

    model: nn.Module
    layout: DecoderLayout
    reader: CheckpointReader
    weights: StreamedWeights
    dtype: torch.dtype
    path: Path

    @property
    def config(self):
        return self.model.config

    def close(self) -> None:
        self.weights.close()

    def __enter__(self) -> "StreamedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve_dtype(config, dtype: str | None) -> torch.dtype:
    """``auto``/None -> the checkpoint's own dtype; otherwise one of float32, bfloat16, float16."""
    if dtype in (None, "auto"):
        return config_dtype(config)
    if dtype not in DTYPES:
        raise DLPError(f"unknown dtype '{dtype}'; use auto or one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def skeleton(path: str | Path, dtype: str | None = "auto", trust_remote_code: bool = False) -> tuple[nn.Module, torch.dtype]:
    """The model of ``path`` on the meta device (buffers real), in the resolved compute dtype."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        torch_dtype = resolve_dtype(config, dtype)
        with MODEL_BUILD_LOCK:  # init_empty_weights and from_config patch process-wide state: one build at a time
            with init_empty_weights():
                model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
            model.tie_weights()  # from_config leaves tied embeddings as two meta tensors; the checkpoint stores one
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise DLPError(f"model {path} needs custom code; rerun with --trust-remote-code if you trust it") from exc
        raise DLPError(f"unsupported model {path}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    return model, torch_dtype


def open_streamed(source: str | Path | ModelRef, *, dtype: str | None = "auto", trust_remote_code: bool = False,
                  prefetch: bool = False) -> StreamedModel:
    """A :class:`StreamedModel` for a local checkpoint folder (or a resolved :class:`ModelRef`). ``prefetch``
    reads the next block on a background thread while the current one computes (one more block in memory);
    on a CUDA device it is always on."""
    path = Path(source.path if isinstance(source, ModelRef) else source)
    if not (path / "config.json").is_file():
        raise DLPError(f"{path} is not a Hugging Face model folder (no config.json)")
    reader = CheckpointReader(path)
    model, torch_dtype = skeleton(path, dtype, trust_remote_code)
    layout = find_decoder(model)
    weights = StreamedWeights(layout, reader, torch_dtype, prefetch=prefetch)
    return StreamedModel(model, layout, reader, weights, torch_dtype, path)
