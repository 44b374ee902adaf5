"""Stage 1 -- fetch the base model: resolve the source to a local safetensors folder and its content hash.

Thin over :func:`dlp.models.resolve_model` (hub id + revision, local folder, .gguf file, or the bundled
``smollm2-135m``, whose GGUF is dequantized once into ``DLP_CACHE_DIR``). Never cached by Prefect: it is
what *produces* the content hash (``ModelRef.fingerprint``: the weights' sha256, or the hub commit sha) that
keys every later stage, so it must look at the model every time. It records a small reference manifest
(``models/<fingerprint>/ref.json``) in the store.

Returned (JSON-able)::

    {"stage": "fetch", "key": <fingerprint>, "computed": bool,
     "ref": {"source", "path", "revision", "fingerprint", "kind"}, "tokenizer_fp": sha256,
     "manifest": {...}}

``path`` is machine-local (never part of a cache key).
"""

from __future__ import annotations

import json
import time
from typing import Any, Mapping


from pipeline.cache import StoreSpec, json_put, run_cached, stage_logger, tokenizer_fingerprint
from tasks.stage import as_state, stage_task

STAGE = "fetch"


def fetch_model(store: Mapping[str, Any], source: str, revision: str | None = None) -> dict[str, Any]:
    """Resolve ``source`` and record it; see the module docstring."""
    from dlp.models import resolve_model

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

    out = run_cached(StoreSpec.of(store), STAGE, ref.fingerprint, artifact_key, compute)
    out["ref"] = ref.to_json()
    out["tokenizer_fp"] = tok_fp
    out["seconds"] = seconds
    return out


@stage_task("fetch")
def fetch_task(store: dict[str, Any], source: str, revision: str | None = None) -> dict[str, Any]:
    return as_state(fetch_model(store, source, revision))


def describe(result: Mapping[str, Any]) -> str:
    return json.dumps({k: result["ref"][k] for k in ("source", "revision", "fingerprint", "kind")})
