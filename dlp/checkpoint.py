"""Write a pruned model as a loadable Hugging Face checkpoint (safetensors + tokenizer + config) with a
sparsity report beside it, atomically: a half-written folder is never left under the final name.

Two ways in: :func:`save_checkpoint` for a model held in memory (``save_pretrained``), and
:class:`CheckpointSink` for a streamed model: each pruned block is written into the planned shards the moment
it is done (:mod:`dlp.checkpoint_writer`), the untouched tensors (embeddings, norms, head) are copied from the
source checkpoint one at a time at the end, so the whole model is never held. The output mirrors the source's
tensor names and layout; floating tensors take the compute dtype.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .checkpoint_reader import INDEX_NAME, TensorInfo
from .checkpoint_writer import DEFAULT_MAX_SHARD_SIZE, ShardedWriter

REPORT_NAME = "dlp_report.json"
#: files copied from the source folder beside the weights (config.json is rewritten for the dtype)
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt", "chat_template.jinja")


@contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to write into; when the block ends without an error it replaces ``out``
    in one rename, so a half-written folder never sits under the final name (and is removed on an error)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield tmp
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_side_files(src: Path, dst: Path, skip: Callable[[Path], bool] = lambda p: p.suffix == ".safetensors") -> None:
    """Copy the plain files of ``src`` (config, tokenizer, reports; not sub-folders) that ``skip`` keeps."""
    for path in Path(src).iterdir():
        if path.is_file() and not skip(path):
            shutil.copy2(path, Path(dst) / path.name)


def save_checkpoint(model, tokenizer, out: str | Path, report: dict) -> Path:
    with staged_folder(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=1))
    return Path(out)


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def partial_folder(out: str | Path) -> Path:
    """Where a streamed checkpoint for ``out`` is assembled (beside it, so the final rename is atomic)."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


class CheckpointSink:
    """The engine's sink for a streamed model: pruned blocks go straight into the output shards.

    ``folder`` is the partial output folder (:func:`partial_folder`); reopening it with the same plan continues
    a killed run (``durable=True`` syncs every block before the journal records it)."""

    def __init__(self, streamed, folder: str | Path, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                 durable: bool = False):
        self.streamed, self.folder, self.durable = streamed, Path(folder), durable
        reader, dtype = streamed.reader, streamed.dtype
        specs = [TensorInfo(t.name, t.file, dtype if t.dtype.is_floating_point else t.dtype, t.shape)
                 for t in reader.tensors.values()]
        self.writer = ShardedWriter(self.folder, specs, max_shard_size=max_shard_size)
        self.written: set[str] = set()

    def __call__(self, index: int, block) -> None:
        weights = self.streamed.weights
        for name in weights.block_names(index):
            key = weights.names[name]
            self.writer.write(key, weights.tensors[name].detach().to("cpu", self.writer.specs[key].dtype))
            self.written.add(key)
        if self.durable:
            self.writer.sync()

    def finish(self, out: str | Path, report: dict) -> Path:
        """Copy the tensors no block wrote, finish the shards, add config/tokenizer/report; move to ``out``."""
        blocks = self.streamed.layout.blocks_path + "."
        weights = self.streamed.weights
        block_keys = {k for n, k in weights.names.items() if n.startswith(blocks)}
        with self.streamed.reader.session() as s:
            for key, spec in self.writer.specs.items():
                if key not in block_keys:
                    self.writer.write(key, s.get(key).to(spec.dtype))
        self.writer.finish(total_parameters=sum(t.numel for t in self.writer.specs.values()))
        self._side_files()
        (self.folder / REPORT_NAME).write_text(json.dumps(report, indent=1))
        out = Path(out)
        _replace(self.folder, out)
        return out

    def _side_files(self) -> None:
        src = self.streamed.path
        config = json.loads((src / "config.json").read_text())
        config["dtype"] = str(self.streamed.dtype).replace("torch.", "")
        config.pop("torch_dtype", None)
        (self.folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in SIDE_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, self.folder / name)
        if len(self.writer.plan) == 1:
            (self.folder / INDEX_NAME).unlink(missing_ok=True)

    def abandon(self) -> None:
        self.writer.close()
