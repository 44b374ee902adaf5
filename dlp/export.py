"""Write a quantized model (:func:`dlp.quantize.quantize`) as a compressed-tensors checkpoint: the
W4A16 / W8A16 "pack-quantized" layout that transformers loads (also on the CPU, dequantized to dense
floats) and vLLM serves with its quantized kernels.

The packing is compressed-tensors' own (``PackedQuantizationCompressor.compress`` on each linear's
``weight`` / ``weight_scale``), model-free: the in-memory model is not modified. Since the weights are
already ``codes * scales`` with the scales in the stored dtype, the packer's ``round(w / s)`` recovers the
codes exactly, and loading back gives the fake-quantized weights -- zeros included.

``config.json`` gets compressed-tensors' ``quantization_config`` (written by its ``ModelCompressor``) with
one config group targeting ``Linear``, every linear outside the decoder blocks (``lm_head``, projections)
in ``ignore``, and no ``sparsity_config`` key: vLLM >= 0.24 rejects a checkpoint that has one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .decoder import find_decoder
from .errors import DLPError
from .quantize import QuantResult

REPORT_NAME = "dlp_report.json"
FORMAT = "pack-quantized"


def quantization_config(result: QuantResult, ignore: list[str]):
    """The compressed-tensors ``QuantizationConfig`` of ``result`` (W4A16 / W8A16 with its group size)."""
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus)

    weights = QuantizationArgs(num_bits=result.spec.bits, type="int", symmetric=True, strategy="group",
                               group_size=result.spec.group_size, dynamic=False)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, format=FORMAT)
    return QuantizationConfig(config_groups={"group_0": scheme}, format=FORMAT, ignore=ignore,
                              quantization_status=QuantizationStatus.COMPRESSED)


def outside_linears(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules outside the decoder blocks (left unquantized)."""
    prefix = find_decoder(model).blocks_path + "."
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith(prefix)]


def compressed_state_dict(model: nn.Module, result: QuantResult, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict with each quantized linear packed by compressed-tensors, the rest in ``dtype``;
    tied weights once (the first name, as ``save_pretrained`` keeps them)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    scheme = quantization_config(result, []).config_groups["group_0"]
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in model.state_dict().items():
        same = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and same in seen:
            continue  # a tied weight (lm_head = embed_tokens): stored once, tied again on load as save_pretrained does
        seen.add(same)
        if name in result.scales:
            module = name.removesuffix("weight")
            scale = result.scales[name].to(dtype)
            # float32 weight: the packer divides in the promoted dtype, so round(w / s) gives back the codes
            local = {"weight": tensor.detach().to(torch.float32), "weight_scale": scale,
                     "weight_zero_point": torch.zeros(scale.shape, dtype=torch.int8)}
            for key, value in PackedQuantizationCompressor.compress(local, scheme).items():
                out[module + key] = value.contiguous()
        else:
            out[name] = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach()
    return out


@dataclass
class ExportInfo:
    path: Path
    bytes_on_disk: int  # the safetensors files
    files: list[str]

    def to_json(self) -> dict:
        return {"path": str(self.path), "bytes_on_disk": self.bytes_on_disk, "files": self.files}


def weight_bytes(folder: str | Path) -> int:
    """Bytes of a checkpoint folder's ``*.safetensors`` files."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def export_compressed(model: nn.Module, tokenizer, result: QuantResult, out: str | Path, *,
                      dtype: torch.dtype | None = None, report: dict | None = None) -> ExportInfo:
    """Write ``out`` (atomically) as a compressed-tensors checkpoint with tokenizer and a DLP report.
    ``dtype`` (default: the scales' dtype) is the dtype of the scales and of every unquantized tensor."""
    from compressed_tensors.compressors import ModelCompressor

    if not result.scales:
        raise DLPError("nothing to export: the model has no quantized linears; run dlp.quantize.quantize first")
    dtype = dtype or result.spec.scale_dtype
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        state = compressed_state_dict(model, result, dtype)
        model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        qconfig = quantization_config(result, outside_linears(model))
        ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
        _finish_config(tmp / "config.json", dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / REPORT_NAME).write_text(json.dumps({**(report or {}), "quantization": result.to_json()}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    return ExportInfo(out, weight_bytes(out), files)


def _finish_config(config_path: Path, dtype: torch.dtype) -> None:
    """The stored dtype (save_pretrained writes the in-memory model's) and no ``sparsity_config``."""
    data = json.loads(config_path.read_text())
    data.get("quantization_config", {}).pop("sparsity_config", None)
    data["dtype"] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True))


def load_dequantized(folder: str | Path, dtype: torch.dtype | None = None):
    """Load a compressed-tensors checkpoint on the CPU with its weights dequantized to dense floats, in
    the stored dtype unless ``dtype`` is given."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    with warnings.catch_warnings():  # "the quantization_config from the model will be used": expected here
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config`")
        model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=CompressedTensorsConfig(dequantize=True),
                                                     use_safetensors=True, dtype=dtype or "auto")
    return model.eval()


#: files of a compressed checkpoint that :func:`dequantize_folder` writes itself
_WRITTEN = ("config.json", "generation_config.json", "model.safetensors.index.json")


def dequantize_folder(folder: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Write the load-back of a compressed-tensors checkpoint (:func:`load_dequantized`) as a plain dense
    Hugging Face folder ``out`` -- no ``quantization_config``, tokenizer and report copied -- so tools that
    read safetensors block by block (:mod:`dlp.streaming`) evaluate exactly what transformers loads.
    Returns the loaded-back model."""
    folder, out = Path(folder), Path(out)
    model = load_dequantized(folder, dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    for item in folder.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name not in _WRITTEN:
            shutil.copy2(item, out / item.name)
    return model

