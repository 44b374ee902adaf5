"""Variants stored as masks over their base (dlp.maskstore): every kind round-trips to the dense copy's
exact bytes (sha256 of each weights file), a changed base is refused in one line, and the stored form is
smaller. Tiny random models: structure only."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from dlp import maskstore, pruning
from dlp.errors import DLPError
from dlp.models import _sha256_file

from . import tiny_models


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    tiny_models.build("llama", layers=2).save_pretrained(folder)
    return folder


def _variant(folder, method, dtype=torch.float32, **save):
    model = tiny_models.build("llama", layers=2).to(dtype)
    pruning.prune(model, [0.5, 0.7], method=method, windows=tiny_models.windows())
    model.save_pretrained(folder, **save)
    return folder


def _same_files(a, b) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.suffix == ".safetensors")
    return names == sorted(p.name for p in b.iterdir() if p.suffix == ".safetensors") and all(
        _sha256_file(a / n) == _sha256_file(b / n) for n in names)


@pytest.mark.parametrize("method,kind,at_most", [("magnitude", "mask", 0.05), ("wanda", "mask", 0.05),
                                                 ("sparsegpt", "mask+values", 0.45)])
def test_round_trip_is_bit_exact(base, tmp_path, method, kind, at_most):
    dense = _variant(tmp_path / "dense", method)
    info = maskstore.pack(dense, base, tmp_path / "var", base_source="tiny")
    assert info.kinds == {"base": 7, kind: 14}  # embeddings, norms, lm_head by reference; 14 pruned linears
    assert info.bytes_variant < at_most * info.bytes_dense
    assert not list((tmp_path / "var").glob("model*.safetensors"))
    out = maskstore.materialize(tmp_path / "var", base, tmp_path / "back")
    assert _same_files(dense, out)
    assert json.loads((out / "config.json").read_text()) == json.loads((dense / "config.json").read_text())


def test_bf16_variant_over_float32_base_and_shards(base, tmp_path):
    dense = _variant(tmp_path / "dense", "wanda", torch.bfloat16, max_shard_size="100KB")
    assert (dense / "model.safetensors.index.json").exists() and len(list(dense.glob("*.safetensors"))) > 1
    info = maskstore.pack(dense, base, tmp_path / "var")
    assert info.kinds == {"base": 7, "mask": 14}  # the base cast to bfloat16 is the variant's survivors
    shards = sorted(p.name for p in dense.glob("*.safetensors"))
    stores = sorted(p.name for p in (tmp_path / "var").glob("*.safetensors"))  # one store file per shard
    assert len(stores) == len(shards) and all(n.startswith("variant-") for n in stores)
    out = maskstore.materialize(tmp_path / "var", base, tmp_path / "back")
    assert _same_files(dense, out) and (out / "model.safetensors.index.json").exists()


def test_quantized_checkpoint_packs_too(base, tmp_path):
    from dlp import export
    from dlp.quantize import quantize

    model = tiny_models.build("llama", layers=2)
    pruning.prune(model, [0.5, 0.7], method="magnitude")
    result = quantize(model, bits=4, group_size=32, method="rtn")
    dense = export.export_compressed(model, None, result, tmp_path / "q4").path
    info = maskstore.pack(dense, base, tmp_path / "var")
    assert info.kinds["base"] == 7  # packed codes, scales and shapes are stored as they are
    assert _same_files(dense, maskstore.materialize(tmp_path / "var", base, tmp_path / "back"))


def test_changed_base_is_refused(base, tmp_path):
    dense = _variant(tmp_path / "dense", "wanda")
    maskstore.pack(dense, base, tmp_path / "var")
    moved = tmp_path / "base-moved"
    shutil.copytree(base, moved)
    maskstore.materialize(tmp_path / "var", moved, tmp_path / "ok")  # same content elsewhere: fine
    other = tiny_models.build("llama", layers=2, seed=1)
    other.save_pretrained(moved)
    with pytest.raises(DLPError) as err:
        maskstore.materialize(tmp_path / "var", moved, tmp_path / "back")
    text = str(err.value)
    assert "changed since the variant was packed" in text and "pass that original base" in text and "\n" not in text
    assert not (tmp_path / "back").exists()


def test_damaged_store_and_wrong_folders(base, tmp_path):
    dense = _variant(tmp_path / "dense", "magnitude")
    with pytest.raises(DLPError, match="is not a mask-stored variant"):
        maskstore.materialize(dense, base, tmp_path / "x")
    maskstore.pack(dense, base, tmp_path / "var")
    with pytest.raises(DLPError, match="already a mask-stored variant"):
        maskstore.pack(tmp_path / "var", base, tmp_path / "var2")
    manifest = json.loads((tmp_path / "var" / maskstore.MANIFEST).read_text())
    name = next(n for n, t in manifest["tensors"].items() if t["kind"] == "mask")
    manifest["tensors"][name]["kind"] = "base"  # a corrupted manifest cannot yield a wrong folder silently
    (tmp_path / "var" / maskstore.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DLPError, match="differs from the packed variant's sha256"):
        maskstore.materialize(tmp_path / "var", base, tmp_path / "back")
    assert not (tmp_path / "back").exists()
