"""Text sources, calibration windows and the perplexity token stream, exactly as the papers sample them.

Source names:
- ``c4``: C4 ``en`` train shard 0 (documents) -- the papers' calibration set.
- ``wikitext2`` / ``wikitext2-test``: WikiText-2 raw, test split (one stream) -- perplexity.
- ``wikitext2-valid``: WikiText-2 validation split (one stream) -- calibration.
- ``hf:PATH[:CONFIG[:SPLIT]]``: any hub dataset with a ``text`` column (documents).
- a local file (``.txt``/``.raw`` stream, ``.jsonl`` with a ``text`` field, ``.parquet`` with a ``text``
  column -- documents) or a folder of such files.

When ``DLP_DATA_DIR`` (see :mod:`dlp.settings`) is set, the named standard datasets are read from that
offline mirror; otherwise from the Hugging Face hub.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from . import settings
from .errors import DLPError

# name -> (path under the data dir, hub spec (path, config, split, data_files), kind)
STANDARD_SOURCES = {
    "c4": ("c4/c4_sample.jsonl", ("allenai/c4", None, "train", {"train": "en/c4-train.00000-of-01024.json.gz"}), "documents"),
    "wikitext2": ("wikitext-2-raw/wiki.test.raw", ("wikitext", "wikitext-2-raw-v1", "test", None), "rows"),
    "wikitext2-test": ("wikitext-2-raw/wiki.test.raw", ("wikitext", "wikitext-2-raw-v1", "test", None), "rows"),
    "wikitext2-valid": ("wikitext-2/valid.txt", ("wikitext", "wikitext-2-raw-v1", "validation", None), "rows"),
}
TEXT_SUFFIXES = {".txt", ".raw"}
DOC_SUFFIXES = {".jsonl", ".json", ".parquet"}


@dataclass
class TextSource:
    """Loaded text: ``kind`` is ``documents`` (sample a document, then a window) or ``rows`` (one stream)."""

    name: str
    kind: str
    items: list[str]

    def stream(self, joiner: str) -> str:
        return joiner.join(self.items)


def _read_rows(path: Path) -> list[str]:
    """Rows of a text file as the released code reads them: text mode (CRLF -> LF), one row per line,
    line ends kept."""
    try:
        with path.open(encoding="utf-8") as fh:
            return fh.read().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as exc:
        raise DLPError(f"cannot read text file {path}: {exc}; pass a readable UTF-8 file") from exc


def _read_documents(path: Path) -> list[str]:
    docs: list[str] = []
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if "text" not in table.column_names:
                raise DLPError(f"{path} has no 'text' column (columns: {', '.join(table.column_names)})")
            docs = [t for t in table.column("text").to_pylist() if t]
        else:
            with path.open(encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DLPError(f"{path}:{n} is not valid JSON ({exc.msg}); expected one object per line") from exc
                    if not isinstance(record, dict) or "text" not in record:
                        raise DLPError(f"{path}:{n} has no 'text' field; expected JSON lines with a 'text' field")
                    docs.append(str(record["text"]))
    except OSError as exc:
        raise DLPError(f"cannot read {path}: {exc}") from exc
    return docs


def _load_path(path: Path, name: str) -> TextSource:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES | DOC_SUFFIXES)
        if not files:
            raise DLPError(f"folder {path} holds no .txt, .raw, .jsonl or .parquet files")
        parts = [_load_path(f, name) for f in files]
        kind = "documents" if any(p.kind == "documents" for p in parts) else "rows"
        if kind == "documents":  # a stream file in a document folder counts as one document
            items = [d for p in parts for d in (p.items if p.kind == "documents" else [p.stream("")])]
        else:
            items = [r for p in parts for r in p.items]
        return TextSource(name, kind, items)
    if path.suffix in TEXT_SUFFIXES:
        source = TextSource(name, "rows", _read_rows(path))
    elif path.suffix in DOC_SUFFIXES:
        source = TextSource(name, "documents", _read_documents(path))
    else:
        raise DLPError(f"unsupported data file {path}: use .txt, .raw, .jsonl (with 'text') or .parquet")
    if not any(s.strip() for s in source.items):
        raise DLPError(f"data file {path} is empty; pass a file with text in it")
    return source


def _load_hub(path: str, config: str | None, split: str, data_files, name: str, kind: str) -> TextSource:
    try:
        import datasets

        ds = datasets.load_dataset(path, config, split=split, data_files=data_files)
    except Exception as exc:  # network errors, unknown datasets
        raise DLPError(
            f"cannot load dataset '{path}' from the hub ({type(exc).__name__}); offline, set DLP_DATA_DIR "
            f"to a local mirror or pass a local file"
        ) from exc
    return TextSource(name, kind, [str(t) for t in ds["text"]])


def load_text(source: str, data_dir: Path | str | None = None) -> TextSource:
    """Load a text source by name, ``hf:`` spec or local path (see the module docstring)."""
    root = Path(data_dir) if data_dir else settings.data_dir()
    if source in STANDARD_SOURCES:
        rel, hub, kind = STANDARD_SOURCES[source]
        if root is not None:
            local = root / rel
            if not local.exists():
                raise DLPError(f"'{source}' expected at {local} under the data dir; fix DLP_DATA_DIR or add the file")
            loaded = _load_path(local, source)
            return TextSource(source, kind, loaded.items)
        return _load_hub(*hub, name=source, kind=kind)
    if source.startswith("hf:"):
        parts = source[3:].split(":")
        path, config, split = parts[0], (parts[1] or None) if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "train"
        return _load_hub(path, config, split, None, source, "documents")
    path = Path(source).expanduser()
    if not path.exists():
        known = ", ".join(STANDARD_SOURCES)
        raise DLPError(f"data source '{source}' is neither a file, a folder, an hf: dataset nor one of: {known}")
    return _load_path(path, source)


def calibration_windows(tokenizer, source: TextSource, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Draw ``nsamples`` windows of ``seqlen`` tokens, as the released Wanda/OWL/DLP code does.

    Documents: a Mersenne Twister seeded with ``seed``; repeat: draw a random document until it has more
    than ``seqlen`` tokens, then a random window. Rows: join with a space, tokenize once, draw random windows.

    The draws come from a private ``random.Random(seed)``: the same sequence the released code gets from
    ``random.seed(seed)``, but another thread using the module-level generator while this one tokenizes
    (Prefect's events client does, on its event-loop thread) can no longer change the windows, and the
    caller's own ``random`` state is left alone.
    """
    if nsamples <= 0:
        raise DLPError(f"nsamples must be a positive integer, got {nsamples}")
    if seqlen <= 1:
        raise DLPError(f"seqlen must be an integer above 1, got {seqlen}")
    rng = random.Random(seed)
    windows = []
    if source.kind == "documents":
        too_short = DLPError(
            f"no document in '{source.name}' is longer than seqlen={seqlen} tokens; lower --seqlen or use a corpus with longer documents"
        )
        if not any(len(d) > seqlen for d in source.items):  # a token spans at least one character
            raise too_short
        cache: dict[int, torch.Tensor] = {}
        for _ in range(nsamples):
            for _attempt in range(100_000):
                i = rng.randint(0, len(source.items) - 1)
                if i not in cache:
                    cache[i] = tokenizer(source.items[i], return_tensors="pt").input_ids
                ids = cache[i]
                if ids.shape[1] > seqlen:
                    break
            else:
                raise too_short
            j = rng.randint(0, ids.shape[1] - seqlen - 1)
            windows.append(ids[:, j : j + seqlen])
    else:
        ids = tokenizer(source.stream(" "), return_tensors="pt").input_ids
        if ids.shape[1] <= seqlen + 1:
            raise DLPError(
                f"'{source.name}' has {ids.shape[1]} tokens, too short for seqlen={seqlen}; lower --seqlen or use more text"
            )
        for _ in range(nsamples):
            j = rng.randint(0, ids.shape[1] - seqlen - 1)
            windows.append(ids[:, j : j + seqlen])
    return torch.cat(windows, dim=0).contiguous()


class _RecordingTokenizer:
    """Tokenizes like ``tokenizer`` (to ``pt`` tensors) and remembers every text it was given, with its ids."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, {}

    def __call__(self, text, **kwargs):
        if text not in self.texts:
            self.texts[text] = self.tokenizer(text, **kwargs)
        return self.texts[text]


def _occurrences(ids: torch.Tensor, windows: torch.Tensor) -> list[tuple[int, int]]:
    """Every token range ``[start, end)`` of the stream ``ids`` (1-D) that equals one of ``windows``."""
    size = windows.shape[1]
    view = ids.unfold(0, size, 1)
    spans = []
    for w in windows:
        starts = (view[:, 0] == w[0]).nonzero().flatten()
        starts = starts[(view[starts, : min(8, size)] == w[: min(8, size)]).all(dim=1)]
        spans += [(int(j), int(j) + size) for j in starts[(view[starts] == w).all(dim=1)]]
    return spans


def training_windows(tokenizer, source: TextSource, count: int, seqlen: int, seed: int,
                     exclude: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, dict]:
    """``count`` windows of ``seqlen`` tokens for recovery fine-tuning, disjoint from the calibration windows
    that :func:`calibration_windows` draws from the same source with ``exclude = (nsamples, seqlen, seed)``.

    Documents: every document the calibration draw tokenized is left out (disjoint by document); the others
    are shuffled with ``random.Random(seed)`` and cut into consecutive windows. Rows: the stream, joined as for
    calibration, is cut into consecutive windows and each one overlapping an occurrence of a calibration window
    is left out (disjoint by token range); the rest are shuffled. When fewer than ``count`` windows exist they
    repeat, reshuffled on each pass. Returns the windows ``[count, seqlen]`` and what was left out.
    """
    rng = random.Random(seed)
    recorder = _RecordingTokenizer(tokenizer)
    calibration = calibration_windows(recorder, source, *exclude) if exclude else None
    if source.kind == "documents":
        order = [i for i, doc in enumerate(source.items) if doc not in recorder.texts and len(doc) >= seqlen]
        rng.shuffle(order)
        chunks = (ids[j : j + seqlen] for i in order
                  for ids in [tokenizer(source.items[i], return_tensors="pt").input_ids[0]]
                  for j in range(0, ids.shape[0] - seqlen + 1, seqlen))
        info = {"rule": "documents", "excluded": sum(doc in recorder.texts for doc in source.items)}
    else:
        ids = recorder(source.stream(" "), return_tensors="pt").input_ids[0]
        spans = _occurrences(ids, calibration) if exclude else []
        starts = [j for j in range(0, ids.shape[0] - seqlen + 1, seqlen)
                  if not any(a < j + seqlen and j < b for a, b in spans)]
        rng.shuffle(starts)
        chunks = (ids[j : j + seqlen] for j in starts)
        info = {"rule": "token ranges", "excluded": len(spans)}
    windows = list(itertools.islice(chunks, count))
    if not windows:
        where = " outside the calibration windows" if exclude else ""
        raise DLPError(f"the training text '{source.name}' has no {seqlen}-token window{where}; "
                       f"lower --seqlen or pass --data with more text")
    pool = list(windows)
    while len(windows) < count:
        rng.shuffle(pool)
        windows += pool[: count - len(windows)]
    info["distinct"] = len(pool)
    return torch.stack(windows).contiguous(), info


def evaluation_tokens(tokenizer, source: TextSource) -> torch.Tensor:
    """The perplexity stream of the papers: rows joined with a blank line, tokenized once -> ``[1, n]``."""
    # as the HF dataset has them: a whitespace-only row is an empty string
    text = "\n\n".join(item if item.strip() else "" for item in source.items)
    return tokenizer(text, return_tensors="pt").input_ids


def fingerprint_tokens(ids: torch.Tensor) -> str:
    """A content hash of token windows (shape and values), stable across processes and machines."""
    h = hashlib.sha256()
    h.update(str(tuple(ids.shape)).encode())
    h.update(ids.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()
