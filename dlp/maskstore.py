"""Variants stored as masks over their base checkpoint, materialised bit-exactly on demand.

A pruned variant of a model differs from its base only in the zeros for magnitude and Wanda (the
survivors *are* the base weights), and in the zeros plus the surviving values for SparseGPT, recovered
or quantized variants. :func:`pack` writes a variant folder that keeps exactly that difference:

- ``dlp_variant.json``: the base's content fingerprint (:func:`dlp.models.folder_fingerprint`), and per
  weights file its safetensors header metadata, tensor order, sha256 and size; per tensor its *kind*;
- ``variant.safetensors`` (``variant-00001-of-0000N.safetensors`` per weights file of a sharded variant, so
  packing and materialising hold one shard's worth at a time): ``NAME::mask`` (1 bit per weight,
  ``numpy.packbits`` of "kept"), ``NAME::values`` (the kept values, flat) or ``NAME::dense`` (the whole
  tensor), as each kind needs;
- the variant's other files (config, tokenizer, report, shard index), copied as they are.

Kinds, chosen per tensor by reconstructing it with the very code :func:`materialize` runs and comparing
bits, cheapest first: ``base`` (equal to the base tensor, cast to the variant's dtype if the dtypes
differ; stored by reference), ``mask`` (base where kept, +0 elsewhere), ``mask+values``, ``dense``.

:func:`materialize` refuses a base whose fingerprint changed since packing (one line naming the fix),
rebuilds every weights file with the recorded metadata, and checks each file's sha256 against the dense
copy's, so the folder it writes is the variant, byte for byte.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import copy_side_files, staged_folder
from .errors import DLPError
from .models import _sha256_file, folder_fingerprint

MANIFEST = "dlp_variant.json"
STORE = "variant.safetensors"
FORMAT = "dlp-maskstore"
VERSION = 1
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ------------------------------------------------------------------ one tensor
def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so -0.0 differs from +0.0, and NaNs compare by their bits)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        view = _BITS[a.element_size()]
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(keep.reshape(-1).numpy()))


def unpack_mask(bits: torch.Tensor, shape: list[int]) -> torch.Tensor:
    n = int(np.prod(shape)) if shape else 1
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=n).astype(bool)).reshape(shape)


def reconstruct(kind: str, dtype: torch.dtype, shape: list[int], base: torch.Tensor | None,
                stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """A variant tensor from its kind, the base tensor and what the store holds for it (the one rule
    :func:`pack` verifies and :func:`materialize` applies)."""
    if kind == "dense":
        return stored["dense"]
    if kind == "base":
        return base.to(dtype)
    keep = unpack_mask(stored["mask"], shape)
    zero = torch.zeros((), dtype=dtype)
    if kind == "mask":
        return torch.where(keep, base.to(dtype), zero)
    out = torch.zeros(shape, dtype=dtype)
    out[keep] = stored["values"]
    return out


def encode(tensor: torch.Tensor, base: torch.Tensor | None) -> tuple[str, dict[str, torch.Tensor]]:
    """The cheapest kind that reconstructs ``tensor`` bit-exactly, and the tensors to store for it."""
    shape, dtype = list(tensor.shape), tensor.dtype
    compatible = base is not None and list(base.shape) == shape and base.is_floating_point() and tensor.is_floating_point()
    if compatible and bits_equal(reconstruct("base", dtype, shape, base, {}), tensor):
        return "base", {}
    if tensor.is_floating_point() and tensor.dim() >= 2:
        keep = tensor != 0
        mask = pack_mask(keep)
        if compatible and bits_equal(reconstruct("mask", dtype, shape, base, {"mask": mask}), tensor):
            return "mask", {"mask": mask}
        candidate = {"mask": mask, "values": tensor[keep].contiguous()}
        cost = mask.numel() + candidate["values"].numel() * tensor.element_size()
        if cost < tensor.numel() * tensor.element_size() and bits_equal(reconstruct("mask+values", dtype, shape, base, candidate), tensor):
            return "mask+values", candidate
    return "dense", {"dense": tensor.contiguous()}


# ------------------------------------------------------------------ folders
def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise DLPError(f"{folder} has no .safetensors weights; pass a Hugging Face model folder")
    return files


def _base_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> the base file that holds it (headers only)."""
    from safetensors import safe_open

    index: dict[str, Path] = {}
    for path in _weight_files(folder):
        with safe_open(str(path), framework="pt") as fh:
            index.update({name: path for name in fh.keys()})
    return index


class _BaseReader:
    """Reads base tensors by name, keeping one file open at a time."""

    def __init__(self, folder: Path):
        self.index = _base_index(folder)
        self._path: Path | None = None
        self._fh = None

    def get(self, name: str) -> torch.Tensor | None:
        from safetensors import safe_open

        path = self.index.get(name)
        if path is None:
            return None
        if path != self._path:
            self._fh, self._path = safe_open(str(path), framework="pt"), path
        return self._fh.get_tensor(name)


@dataclass
class PackInfo:
    path: Path
    bytes_variant: int  # every file of the packed variant folder
    bytes_dense: int  # the dense variant's weights files
    kinds: dict[str, int]  # kind -> tensors

    def to_json(self) -> dict:
        return {"path": str(self.path), "bytes_variant": self.bytes_variant, "bytes_dense": self.bytes_dense,
                "ratio": self.bytes_variant / max(self.bytes_dense, 1), "kinds": self.kinds}


def folder_bytes(folder: Path) -> int:
    """Bytes of a model folder's files (weights, config, tokenizer, ...): what a copy of it costs."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _check_folder(folder: Path, what: str) -> None:
    if not (folder / "config.json").is_file():
        raise DLPError(f"{what} {folder} is not a Hugging Face model folder (no config.json)")


def _store_name(i: int, n: int) -> str:
    return STORE if n == 1 else f"variant-{i + 1:05d}-of-{n:05d}.safetensors"


def _pack_file(path: Path, reader: _BaseReader, manifest: dict, kinds: dict[str, int]) -> dict[str, torch.Tensor]:
    """Encode one weights file of the variant: its manifest entries, and the tensors its store file holds."""
    from safetensors import safe_open

    store: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as fh:
        names = list(fh.keys())
        manifest["files"][path.name] = {"metadata": fh.metadata(), "tensors": names,
                                        "sha256": _sha256_file(path), "bytes": path.stat().st_size}
        for name in names:
            tensor = fh.get_tensor(name)
            kind, parts = encode(tensor, reader.get(name))
            kinds[kind] = kinds.get(kind, 0) + 1
            manifest["tensors"][name] = {"kind": kind, "dtype": str(tensor.dtype).removeprefix("torch."),
                                         "shape": list(tensor.shape), "sha256": tensor_sha256(tensor)}
            store.update({f"{name}::{part}": value for part, value in parts.items()})
    return store


def pack(variant: str | Path, base: str | Path, out: str | Path, *, base_source: str | None = None) -> PackInfo:
    """Store the model folder ``variant`` as masks (and values) over the base folder ``base`` (module docstring)."""
    from safetensors.torch import save_file

    variant, base, out = Path(variant), Path(base), Path(out)
    _check_folder(variant, "variant")
    _check_folder(base, "base")
    if (variant / MANIFEST).exists():
        raise DLPError(f"{variant} is already a mask-stored variant; materialize it first with dlp materialize")
    reader = _BaseReader(base)
    manifest = {"format": FORMAT, "version": VERSION,
                "base": {"fingerprint": folder_fingerprint(base), "source": base_source or str(base)},
                "files": {}, "tensors": {}}
    kinds: dict[str, int] = {}
    files = _weight_files(variant)
    with staged_folder(out) as tmp:
        for i, path in enumerate(files):  # one weights file in memory at a time
            store = _pack_file(path, reader, manifest, kinds)
            manifest["files"][path.name]["store"] = _store_name(i, len(files))
            save_file(store, str(tmp / _store_name(i, len(files))), metadata={"format": FORMAT})
            del store
        copy_side_files(variant, tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    dense = sum(f["bytes"] for f in manifest["files"].values())
    return PackInfo(out, folder_bytes(out), dense, kinds)


def read_manifest(variant: str | Path) -> dict:
    """The manifest of a mask-stored variant folder (a clear error when it is none)."""
    path = Path(variant) / MANIFEST
    if not path.is_file():
        raise DLPError(f"{variant} is not a mask-stored variant (no {MANIFEST}); write one with dlp pack")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DLPError(f"{path} is format {manifest.get('format')} v{manifest.get('version')}; this dlp reads {FORMAT} v{VERSION}")
    return manifest


def check_base(manifest: dict, base: str | Path) -> None:
    """Refuse a base whose content differs from the one the variant was packed over."""
    base = Path(base)
    _check_folder(base, "base")
    want, got = manifest["base"]["fingerprint"], folder_fingerprint(base)
    if got != want:
        raise DLPError(f"base {base} changed since the variant was packed (content {got[:12]}, packed over {want[:12]} "
                       f"from {manifest['base']['source']}); pass that original base checkpoint, or re-pack the variant over this one")


def _materialize_file(store_path: Path, info: dict, tensors_meta: dict, reader: _BaseReader, out: Path) -> None:
    """Rebuild one weights file of the variant from its store file and the base, with its recorded metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    with safe_open(str(store_path), framework="pt") as store:
        stored = set(store.keys())
        for name in info["tensors"]:
            meta = tensors_meta[name]
            parts = {p: store.get_tensor(f"{name}::{p}") for p in ("dense", "mask", "values") if f"{name}::{p}" in stored}
            base_tensor = reader.get(name) if meta["kind"] in ("base", "mask") else None
            tensors[name] = reconstruct(meta["kind"], getattr(torch, meta["dtype"]), meta["shape"], base_tensor, parts)
    save_file(tensors, str(out), metadata=info["metadata"])


def materialize(variant: str | Path, base: str | Path, out: str | Path) -> Path:
    """Write the standard Hugging Face folder the variant was packed from, bit-exactly (module docstring)."""
    variant, out = Path(variant), Path(out)
    manifest = read_manifest(variant)
    check_base(manifest, base)
    reader = _BaseReader(Path(base))
    with staged_folder(out) as tmp:
        stores = {info["store"] for info in manifest["files"].values()}
        copy_side_files(variant, tmp, skip=lambda p: p.name == MANIFEST or p.name in stores)
        for filename, info in manifest["files"].items():
            _materialize_file(variant / info["store"], info, manifest["tensors"], reader, tmp / filename)
            if _sha256_file(tmp / filename) != info["sha256"]:
                raise DLPError(f"materialized {filename} differs from the packed variant's sha256; "
                               f"the variant folder {variant} is damaged: re-pack it from its dense copy")
    return out
