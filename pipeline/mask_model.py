"""The MLflow model of a variant stored as masks over its base: a ``mlflow.pyfunc`` model whose only artifact is
the packed variant (:mod:`dlp.maskstore`), and whose ``model_config`` names the base checkpoint (its content
sha256 and its artifact URI, logged once per base by :mod:`pipeline.mask_registry`).

Loading it (``mlflow.pyfunc.load_model("models:/NAME@candidate")``) runs :meth:`MaskStoredModel.load_context`:
the base is read where it lives (a local ``file:`` URI directly, anything else downloaded once into
``DLP_CACHE_DIR/bases/<sha256>``), the variant is materialised bit-exactly into a standard Hugging Face folder
(refused in one line when the base's content changed) and loaded with transformers. ``unwrap_python_model()``
gives the :class:`MaskStoredModel`, whose ``model`` / ``tokenizer`` / ``path`` are the transformers objects and
the materialised folder; ``predict`` generates a continuation per prompt. :func:`load_registered` does both.

This module imports mlflow; import it lazily.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow.pyfunc

__all__ = ["MaskStoredModel", "base_folder", "load_registered"]

VARIANT_ARTIFACT = "variant"


def base_folder(uri: str, sha256: str) -> Path:
    """A local folder holding the base checkpoint at ``uri`` (its content is checked by materialize)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        local = Path(url2pathname(parsed.path) if parsed.scheme else uri)
        if local.is_dir():
            return local
    from dlp.settings import cache_dir

    target = cache_dir() / "bases" / sha256
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{sha256[:12]}-", dir=target.parent))
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
        (got / ".complete").write_text(sha256)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(got, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class MaskStoredModel(mlflow.pyfunc.PythonModel):
    """A mask-stored variant, materialised and loaded with transformers on ``load_context``."""

    def load_context(self, context: Any) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from dlp.maskstore import materialize

        config = context.model_config or {}
        base = base_folder(config["base_uri"], config["base_sha256"])
        self.path = Path(tempfile.mkdtemp(prefix="dlp-materialized-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.path), True)
        materialize(context.artifacts[VARIANT_ARTIFACT], base, self.path / "model")
        self.path = self.path / "model"
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype="auto")  # the dtype it was saved in
        self.model.eval()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError):  # a checkpoint logged without its tokenizer
            self.tokenizer = None

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        """A greedy continuation of each prompt (a list of strings, one string or a one-column frame;
        ``params``: ``max_new_tokens``, default 32; see :func:`signature`)."""
        import torch

        if self.tokenizer is None:
            raise ValueError("this variant was logged without a tokenizer; use unwrap_python_model().model")
        new = int((params or {}).get("max_new_tokens", 32))
        if hasattr(model_input, "columns"):
            model_input = model_input[model_input.columns[0]]
        prompts = [model_input] if isinstance(model_input, str) else [str(p) for p in model_input]
        out = []
        for prompt in prompts:
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                gen = self.model.generate(ids, max_new_tokens=new, do_sample=False)
            out.append(self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        return out


def signature() -> Any:
    """Prompts in (strings), continuations out (strings), ``max_new_tokens`` as a parameter."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec("max_new_tokens", "long", 32)]))


def load_registered(model_uri: str) -> MaskStoredModel:
    """``mlflow.pyfunc.load_model(model_uri)``'s :class:`MaskStoredModel` (``.model``, ``.tokenizer``, ``.path``)."""
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
