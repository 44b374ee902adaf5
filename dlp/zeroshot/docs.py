"""Offline loaders for the zero-shot evaluation sets.

Each ``load_<task>`` reads the local copy under ``<data_dir>/evalsets/`` (see
``evalsets/MANIFEST.md`` in the shared data folder) and returns a ``DatasetDict`` whose split name,
field names and value types are those of the Hugging Face hub dataset the stock lm-eval task loads.
The task YAMLs in ``dlp/zeroshot/tasks/`` then apply the stock prompts, choices and targets unchanged.

The loaders are used as lm-eval ``custom_dataset`` callables: lm-eval calls them with the task's
``metadata`` and ``dataset_kwargs`` as keyword arguments, so every loader takes ``data_dir`` and ignores
the rest. Datasets are built in memory (``Dataset.from_list``): nothing is written to the HF cache.

Fidelity notes (what cannot be recovered from the local files):

- HellaSwag is llama.cpp's plain-text rendering (6 lines per item). Its first line is
  ``activity_label + ": " + ctx`` after stripping the WikiHow tags, so ``ctx_a``/``ctx_b`` are rebuilt:
  a context that ends a sentence (all 6799 WikiHow items) gets ``ctx_b = ""``; any other context (the
  3243 ActivityNet items, which end in an incomplete noun phrase) gets ``ctx_b`` = the text after the
  last sentence end (e.g. "he", "the lady"), which the stock preprocessing capitalises. ``ind`` is the item's position, ``source_id``/``split_type`` are unknown.
  Endings whose original text began with a tag (e.g. "[title] ...") keep a leading space in the stock
  preprocessing; the rendering dropped it.
- BoolQ ``val.jsonl`` (SuperGLUE layout) stores labels as "true"/"false"; they become the ClassLabel
  ints of ``aps/super_glue`` (False=0, True=1). Google's original ``dev.jsonl`` is used when
  ``val.jsonl`` is absent (``passage = title + " -- " + passage``, as in SuperGLUE).
- RTE reads the GLUE validation parquet (what ``nyu-mll/glue`` serves); the SuperGLUE ``val.jsonl``
  differs in 6 rows and is not used.
"""
from __future__ import annotations

import bz2
import json
import re
from pathlib import Path
from typing import Any

from .. import settings
from ..errors import DLPError

# task -> files it reads, relative to evalsets/
FILES: dict[str, list[str]] = {
    "boolq": ["boolq/val.jsonl"],
    "rte": ["rte/validation.parquet"],
    "hellaswag": ["hellaswag/hellaswag_val_full.txt.bz2"],
    "winogrande": ["winogrande/dev.jsonl", "winogrande/dev-labels.lst"],
    "arc_easy": ["arc_easy/ARC-Easy-Test.jsonl"],
    "arc_challenge": ["arc_challenge/ARC-Challenge-Test.jsonl"],
    "openbookqa": ["openbookqa/test.jsonl"],
    "piqa": ["piqa/valid.jsonl", "piqa/valid-labels.lst"],
    "lambada_openai": ["lambada/lambada_test.jsonl"],
}
# files that can stand in for a missing required one
FALLBACKS: dict[str, str] = {"boolq/val.jsonl": "boolq/dev.jsonl"}


def evalsets_dir(data_dir: str | Path | None = None) -> Path:
    """The ``evalsets/`` folder: under ``data_dir`` when given, else under ``DLP_DATA_DIR``.

    ``data_dir`` may be the data root (that holds ``evalsets/``) or the ``evalsets`` folder itself.
    """
    if data_dir is None:
        data_dir = settings.data_dir()  # env DLP_DATA_DIR
        if data_dir is None:
            raise DLPError("no offline data folder: pass data_dir= or set DLP_DATA_DIR to the folder that holds "
                           "evalsets/ (or use tasks_source='hub' with internet access)")
    root = Path(data_dir).expanduser().resolve()
    if (root / "evalsets").is_dir():
        return root / "evalsets"
    if root.name == "evalsets" and root.is_dir():
        return root
    raise DLPError(f"data folder {root} has no evalsets/ subfolder; point data_dir= or DLP_DATA_DIR at the "
                   "folder that holds evalsets/")




def required_file(evalsets: Path, rel: str) -> Path:
    """``evalsets/rel`` (or its stand-in), or a one-line DLPError naming the file and the setting."""
    path = evalsets / rel
    if path.is_file():
        return path
    alt = FALLBACKS.get(rel)
    if alt and (evalsets / alt).is_file():
        return evalsets / alt
    raise DLPError(f"missing evaluation file {path}; set DLP_DATA_DIR (or data_dir=) to the shared data folder "
                   "whose evalsets/ holds it, see evalsets/MANIFEST.md")


def check_files(task: str, data_dir: str | Path | None = None) -> list[Path]:
    """The files ``task`` reads; raises DLPError if one is missing."""
    evalsets = evalsets_dir(data_dir)
    return [required_file(evalsets, rel) for rel in FILES[task]]


# --------------------------------------------------------------------------- readers
def _jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _labels(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def _dataset_dict(split: str, rows: list[dict]):
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def _bool_label(value: Any, where: str) -> int:
    if isinstance(value, bool):
        return int(value)
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return 1
    if text in ("false", "0"):
        return 0
    raise DLPError(f"unexpected BoolQ label {value!r} in {where}; expected true/false")


# --------------------------------------------------------------------------- per-task loaders
def load_boolq(data_dir=None, **_):
    """``aps/super_glue`` boolq validation: question, passage, idx, label (0 = False, 1 = True)."""
    (path,) = check_files("boolq", data_dir)
    rows = []
    for i, d in enumerate(_jsonl(path)):
        if "label" in d:  # SuperGLUE layout, passage already "title -- passage"
            passage, label = d["passage"], _bool_label(d["label"], str(path))
        else:  # Google's original release
            passage, label = f"{d['title']} -- {d['passage']}", _bool_label(d["answer"], str(path))
        rows.append({"question": d["question"], "passage": passage, "idx": int(d.get("idx", i)), "label": label})
    return _dataset_dict("validation", rows)


def load_rte(data_dir=None, **_):
    """``nyu-mll/glue`` rte validation: sentence1, sentence2, label (0 = entailment), idx."""
    import datasets
    import pyarrow.parquet as pq

    (path,) = check_files("rte", data_dir)
    table = pq.read_table(path, columns=["sentence1", "sentence2", "label", "idx"])
    return datasets.DatasetDict({"validation": datasets.Dataset(table)})


_SENTENCE_END = re.compile(r"^(.*[.!?])\s+(\S.*)$", re.S)


def split_hellaswag_context(ctx: str) -> tuple[str, str]:
    """Rebuild ``(ctx_a, ctx_b)`` from the rendered context (see the module docstring)."""
    if ctx[-1:] in ".!?":  # ends with a full sentence (WikiHow): no incomplete noun phrase
        return ctx, ""
    match = _SENTENCE_END.match(ctx)
    if match is None:
        return ctx, ""
    return match.group(1), match.group(2)


def parse_hellaswag_text(lines: list[str], where: str = "hellaswag") -> list[dict]:
    """Items of the 6-lines-per-item rendering as ``Rowan/hellaswag`` rows."""
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    if len(lines) % 6:
        raise DLPError(f"{where}: {len(lines)} lines is not a multiple of 6; the file is not the HellaSwag text "
                       "rendering described in evalsets/MANIFEST.md")
    rows = []
    for i in range(0, len(lines), 6):
        head, label, endings = lines[i], lines[i + 1].strip(), lines[i + 2:i + 6]
        activity_label, sep, ctx = head.partition(": ")
        if not sep or label not in ("0", "1", "2", "3"):
            raise DLPError(f"{where}: item {i // 6} (line {i + 1}) is malformed; expected 'label: context', "
                           "a gold index 0-3 and 4 endings")
        ctx_a, ctx_b = split_hellaswag_context(ctx)
        rows.append({
            "ind": i // 6, "activity_label": activity_label, "ctx_a": ctx_a, "ctx_b": ctx_b,
            "ctx": ctx, "endings": list(endings), "source_id": "", "split": "val", "split_type": "",
            "label": label,
        })
    return rows


def load_hellaswag(data_dir=None, **_):
    """``Rowan/hellaswag`` validation, rebuilt from the bz2 text rendering."""
    (path,) = check_files("hellaswag", data_dir)
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    return _dataset_dict("validation", parse_hellaswag_text(lines, str(path)))


def load_winogrande(data_dir=None, **_):
    """``allenai/winogrande`` winogrande_xl validation: sentence, option1, option2, answer ("1"/"2")."""
    path, labels_path = check_files("winogrande", data_dir)
    docs, labels = _jsonl(path), _labels(labels_path)
    if len(docs) != len(labels):
        raise DLPError(f"{labels_path} has {len(labels)} labels for {len(docs)} items in {path}; use the matching pair")
    rows = []
    for i, (d, label) in enumerate(zip(docs, labels)):
        if d.get("answer") not in (None, "", label):
            raise DLPError(f"item {i} of {path} has answer {d['answer']!r} but {labels_path} says {label!r}; "
                           "use the matching pair")
        rows.append({"sentence": d["sentence"], "option1": d["option1"], "option2": d["option2"], "answer": label})
    return _dataset_dict("validation", rows)


def _ai2_rows(path: Path, question_key: str) -> list[dict]:
    rows = []
    for d in _jsonl(path):
        q = d["question"]
        rows.append({
            "id": d["id"],
            question_key: q["stem"],
            "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]},
            "answerKey": d["answerKey"],
        })
    return rows


def load_arc_easy(data_dir=None, **_):
    """``allenai/ai2_arc`` ARC-Easy test: id, question, choices{text,label}, answerKey."""
    (path,) = check_files("arc_easy", data_dir)
    return _dataset_dict("test", _ai2_rows(path, "question"))


def load_arc_challenge(data_dir=None, **_):
    """``allenai/ai2_arc`` ARC-Challenge test."""
    (path,) = check_files("arc_challenge", data_dir)
    return _dataset_dict("test", _ai2_rows(path, "question"))


def load_openbookqa(data_dir=None, **_):
    """``allenai/openbookqa`` main test: id, question_stem, choices{text,label}, answerKey."""
    (path,) = check_files("openbookqa", data_dir)
    return _dataset_dict("test", _ai2_rows(path, "question_stem"))


def load_piqa(data_dir=None, **_):
    """``baber/piqa`` validation: goal, sol1, sol2, label (int, from valid-labels.lst)."""
    path, labels_path = check_files("piqa", data_dir)
    docs, labels = _jsonl(path), _labels(labels_path)
    if len(docs) != len(labels):
        raise DLPError(f"{labels_path} has {len(labels)} labels for {len(docs)} items in {path}; use the matching pair")
    rows = [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(label)}
            for d, label in zip(docs, labels)]
    return _dataset_dict("validation", rows)


def load_lambada_openai(data_dir=None, **_):
    """``EleutherAI/lambada_openai`` default test: text."""
    (path,) = check_files("lambada_openai", data_dir)
    return _dataset_dict("test", [{"text": d["text"]} for d in _jsonl(path)])
