"""Out-of-core engine: a model streamed block by block from its safetensors checkpoint gives exactly what the
same model held in memory gives -- statistics, pruned weights and perplexity -- on all seven architectures, with
single-file and sharded checkpoints, with the calibration states in memory or spilled to disk."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from dlp import allocation
from dlp.checkpoint import CheckpointSink, partial_folder
from dlp.perplexity import perplexity
from dlp.pruning import measured_sparsity, prune
from dlp.statistics import collect_statistics
from dlp.streaming import open_streamed
from tests import tiny_models


def save_tiny(arch, folder, shard=None, layers=3, dtype=torch.float32):
    model = tiny_models.build(arch, layers=layers).to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(folder), **kwargs)
    return model


def weights_of(folder):
    from dlp.checkpoint_reader import CheckpointReader

    reader = CheckpointReader(folder)
    return {k: reader.get(k) for k in reader.tensors}


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_streamed_statistics_masks_and_perplexity_equal_in_memory(arch, tmp_path):
    model = save_tiny(arch, tmp_path / "src", shard="40KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").exists()  # the sharded layout is exercised
    windows = tiny_models.windows(6, 32)
    dense_stats = collect_statistics(model, windows, batch_size=4)
    with open_streamed(tmp_path / "src") as sm:
        stats = collect_statistics(sm, windows, batch_size=4)
    assert stats.blocks == dense_stats.blocks
    assert all(torch.equal(stats.norm2[k], dense_stats.norm2[k]) for k in dense_stats.norm2)

    ratios = allocation.dlp(dense_stats, 0.5, 0.1, "mean").ratios
    mem_report = prune(model, ratios, method="sparsegpt", mode="sequential", windows=windows, batch_size=4)
    with open_streamed(tmp_path / "src") as sm:
        sink = CheckpointSink(sm, partial_folder(tmp_path / "out"))
        report = prune(sm, ratios, method="sparsegpt", mode="sequential", windows=windows, batch_size=4, sink=sink)
        sink.finish(tmp_path / "out", report.to_json())
    assert report.achieved == mem_report.achieved
    out = weights_of(tmp_path / "out")
    mem = {k: v for k, v in model.state_dict().items()}
    for key, value in out.items():
        if key in mem:
            assert torch.equal(value, mem[key]), key

    ids = tiny_models.windows(1, 200, seed=3).reshape(1, -1)
    with open_streamed(tmp_path / "out") as sm:
        streamed = perplexity(sm, ids, 32, batch_size=2)
    assert streamed == perplexity(model, ids, 32, batch_size=2)


def test_pruned_sharded_output_loads_back_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    save_tiny("llama", tmp_path / "src")
    windows = tiny_models.windows(4, 32)
    with open_streamed(tmp_path / "src") as sm:
        ratios = [0.5] * sm.layout.num_blocks
        sink = CheckpointSink(sm, partial_folder(tmp_path / "out"), max_shard_size="30KB")
        report = prune(sm, ratios, method="wanda", mode="sequential", windows=windows, sink=sink)
        sink.finish(tmp_path / "out", report.to_json())
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not partial_folder(tmp_path / "out").exists()
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert measured_sparsity(loaded) == pytest.approx(report.achieved)
    with open_streamed(tmp_path / "out") as sm:
        assert measured_sparsity(sm) == measured_sparsity(loaded)
    assert json.loads((tmp_path / "out" / "dlp_report.json").read_text())["method"] == "wanda"


def test_native_dtype_is_the_checkpoints_and_accumulators_stay_float32(tmp_path):
    save_tiny("llama", tmp_path / "src", dtype=torch.bfloat16)
    with open_streamed(tmp_path / "src") as sm:
        assert sm.dtype == torch.bfloat16
        stats = collect_statistics(sm, tiny_models.windows(4, 32))
        sink = CheckpointSink(sm, partial_folder(tmp_path / "out"))
        report = prune(sm, [0.5] * 3, method="wanda", mode="oneshot", stats=stats, sink=sink)
        sink.finish(tmp_path / "out", report.to_json())
    assert all(v.dtype == torch.float32 for v in stats.norm2.values())
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as fh:
        assert fh.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    with open_streamed(tmp_path / "src", dtype="float32") as sm:
        assert sm.dtype == torch.float32


def test_spilled_calibration_states_give_identical_results(tmp_path):
    model = save_tiny("qwen2", tmp_path / "src")
    windows = tiny_models.windows(6, 32)
    in_memory = collect_statistics(model, windows, batch_size=4)
    spilled = collect_statistics(model, windows, batch_size=4, memory_budget=1, spill_dir=tmp_path / "spill")
    assert spilled.blocks == in_memory.blocks
    assert list((tmp_path / "spill").iterdir()) == []  # spill files are removed when the walk ends
    ids = tiny_models.windows(1, 160, seed=2).reshape(1, -1)
    assert perplexity(model, ids, 32, memory_budget=1, spill_dir=tmp_path / "spill") == perplexity(model, ids, 32)


def test_perplexity_through_the_engine_matches_a_plain_forward():
    import math

    import torch.nn.functional as F

    model = tiny_models.build("llama")
    ids = tiny_models.windows(1, 128, seed=5).reshape(1, -1)
    chunks = ids.reshape(4, 32)
    with torch.no_grad():
        logits = model(input_ids=chunks).logits.float()
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), chunks[:, 1:].reshape(-1))
    assert perplexity(model, ids, 32)["ppl"] == pytest.approx(math.exp(float(loss)), rel=1e-5)


class _Kill(RuntimeError):
    pass


def _interrupt_after(monkeypatch, cls, method, blocks_done):
    """Make ``cls.method`` raise once ``blocks_done`` blocks have gone through it (a stand-in for a kill)."""
    original = getattr(cls, method)
    calls = []

    def wrapped(self, index, *args, **kwargs):
        if index >= blocks_done:
            raise _Kill(f"killed at block {index}")
        calls.append(index)
        return original(self, index, *args, **kwargs)

    monkeypatch.setattr(cls, method, wrapped)
    return calls


@pytest.mark.parametrize("method,mode", [("wanda", "sequential"), ("sparsegpt", "sequential"), ("magnitude", "oneshot")])
def test_killed_prune_resumes_at_the_first_unfinished_block_bit_identical(method, mode, tmp_path, monkeypatch):
    from dlp.pruning import prune_checkpoint, state_folder

    save_tiny("llama", tmp_path / "src", layers=4)
    windows = tiny_models.windows(6, 32)
    ratios = [0.4, 0.5, 0.6, 0.5]
    opts = dict(method=method, mode=mode, windows=windows, batch_size=4, max_shard_size="60KB")
    with open_streamed(tmp_path / "src") as sm:
        reference = prune_checkpoint(sm, tmp_path / "ref", ratios, run_key="k", **opts)
    with monkeypatch.context() as m:
        _interrupt_after(m, CheckpointSink, "__call__", 2)
        with open_streamed(tmp_path / "src") as sm, pytest.raises(_Kill):
            prune_checkpoint(sm, tmp_path / "out", ratios, run_key="k", **opts)
    assert (state_folder(tmp_path / "out") / "prune" / "journal.json").exists()
    calls = []
    original = CheckpointSink.__call__
    monkeypatch.setattr(CheckpointSink, "__call__", lambda self, i, b: (calls.append(i), original(self, i, b)))
    with open_streamed(tmp_path / "src") as sm:
        resumed = prune_checkpoint(sm, tmp_path / "out", ratios, run_key="k", **opts)
    assert calls == [2, 3]  # blocks 0 and 1 were not pruned again
    assert resumed.achieved == reference.achieved
    ref, out = weights_of(tmp_path / "ref"), weights_of(tmp_path / "out")
    assert ref.keys() == out.keys() and all(torch.equal(ref[k], out[k]) for k in ref)
    assert not state_folder(tmp_path / "out").exists()


def test_killed_statistics_sweep_resumes_bit_identical(tmp_path, monkeypatch):
    from dlp.resume import BlockJournal
    from dlp.statistics import StatisticsVisitor

    save_tiny("mistral", tmp_path / "src", layers=4)
    windows = tiny_models.windows(6, 32)
    with open_streamed(tmp_path / "src") as sm:
        reference = collect_statistics(sm, windows, batch_size=4)
    with monkeypatch.context() as m:
        _interrupt_after(m, StatisticsVisitor, "after_forward", 3)
        with open_streamed(tmp_path / "src") as sm, pytest.raises(_Kill):
            collect_statistics(sm, windows, batch_size=4, journal=BlockJournal(tmp_path / "state", "k"))
    assert BlockJournal(tmp_path / "state", "k").next_block == 3
    with open_streamed(tmp_path / "src") as sm:
        resumed = collect_statistics(sm, windows, batch_size=4, journal=BlockJournal(tmp_path / "state", "k"))
    assert resumed.blocks == reference.blocks and resumed.meta["block_passes"] == 1.0
    assert all(torch.equal(resumed.norm2[k], reference.norm2[k]) for k in reference.norm2)
    assert BlockJournal(tmp_path / "state", "other").next_block == 0  # another run's key starts afresh


def _corrupt(kind, folder):
    import os

    index = folder / "model.safetensors.index.json"
    shards = sorted(folder.glob("model-*.safetensors"))
    if kind == "missing shard":
        shards[1].unlink()
        return shards[1].name
    if kind == "truncated shard":
        with shards[0].open("r+b") as fh:
            fh.truncate(os.path.getsize(shards[0]) - 100)
        return shards[0].name
    if kind == "index names a missing file":
        data = json.loads(index.read_text())
        key = next(iter(data["weight_map"]))
        data["weight_map"][key] = "model-99999-of-99999.safetensors"
        index.write_text(json.dumps(data))
        return "model-99999-of-99999.safetensors"
    raise KeyError(kind)


@pytest.mark.parametrize("kind", ["missing shard", "truncated shard", "index names a missing file"])
def test_bad_checkpoints_fail_in_one_line_naming_the_file(kind, tmp_path):
    from dlp.errors import DLPError

    save_tiny("llama", tmp_path / "src", shard="40KB")
    name = _corrupt(kind, tmp_path / "src")
    with pytest.raises(DLPError) as err:
        open_streamed(tmp_path / "src")
    assert name in str(err.value) and "\n" not in str(err.value)


def test_skeletons_built_on_many_threads_at_once_keep_tied_embeddings(tmp_path):
    """A sweep on a thread or Dask runner opens one checkpoint per variant at the same time; the meta-device
    patches are process-wide, so unserialised builds handed some threads an untied head with no tensor."""
    from concurrent.futures import ThreadPoolExecutor

    model = tiny_models.build("llama", layers=2)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(str(tmp_path))
    with ThreadPoolExecutor(6) as pool:
        opened = list(pool.map(lambda _: open_streamed(tmp_path), range(12)))
    heads = [s.model.get_output_embeddings().weight is s.model.get_input_embeddings().weight for s in opened]
    assert heads == [True] * 12
