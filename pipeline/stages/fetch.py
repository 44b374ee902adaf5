"""Stage 1 -- fetch the base model: resolve the source to a local safetensors folder and its content hash.

Thin over :func:`dlp.models.resolve_model` (hub id + revision, local folder, .gguf file, or the bundled
``smollm2-135m``, whose GGUF is dequantized once into ``DLP_CACHE_DIR``). Never cached by Prefect: it is
what *produces* the content hash (``ModelRef.fingerprint``: the weights' sha256, or the hub commit sha) that
keys every later stage, so it must look at the model every time. It records a small reference manifest
(``models/<fingerprint>/ref.json``) in the store.

Returns a :class:`pipeline.results.FetchResult` (``ref.path`` is machine-local: never part of a cache key).
"""

from __future__ import annotations

import time
from typing import Any, Mapping

from pipeline.cache import StoreSpec, json_put, run_cached, stage_logger, tokenizer_fingerprint
from pipeline.results import FetchResult, ModelSource

STAGE = "fetch"


def fetch_model(store: StoreSpec | Mapping[str, Any], source: str, revision: str | None = None) -> FetchResult:
    """Resolve ``source`` and record it; see the module docstring."""
    from dlp.models import native_dtype_name, resolve_model

    logger = stage_logger(STAGE)
    t0 = time.perf_counter()
    ref = resolve_model(source, revision)
    tok_fp = tokenizer_fingerprint(ref.path)
    seconds = round(time.perf_counter() - t0, 3)
    logger.info("fetch: %s -> %s (%s, fingerprint %s, %.1fs)", source, ref.path, ref.kind, ref.fingerprint[:12], seconds)
    record = {
        "source": ref.source,
        "revision": ref.revision,
        "fingerprint": ref.fingerprint,
        "kind": ref.kind,
        "tokenizer_fp": tok_fp,
    }
    artifact_key = f"models/{ref.fingerprint}/{tok_fp[:16]}/ref.json"

    def compute(st):
        return json_put(st, artifact_key, record), {"seconds": seconds, **record}

    found = run_cached(StoreSpec.of(store), STAGE, ref.fingerprint, artifact_key, compute)
    return found.typed(FetchResult, ref=ModelSource(**ref.to_json()), tokenizer_fp=tok_fp, seconds=seconds,
                       native_dtype=native_dtype_name(ref.path))

