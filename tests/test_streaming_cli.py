"""The streamed ``dlp`` commands: a bad checkpoint or too little disk fails in one line with exit 2 before any
work; ``dlp prune`` killed with SIGKILL mid-run and started again resumes at its first unfinished block and
ends bit-identical; ``dlp eval`` past ``--max-memory`` runs offloaded with the same accuracy."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dlp.checkpoint_reader import CheckpointReader
from tests.test_cli import run
from tests.test_pipeline_flow import make_tiny_model
from tests.test_streaming import _corrupt

from .conftest import ROOT


@pytest.fixture(scope="module")
def sharded_tiny(tmp_path_factory):
    """A tiny random Llama (SmolLM2's tokenizer) saved in several shards."""
    return make_tiny_model(tmp_path_factory.mktemp("sharded-tiny"), layers=6, tied=False, max_shard_size="2MB")


PRUNE = ("prune", "--calibration", "wikitext2-valid", "--nsamples", "4", "--seqlen", "64")


@pytest.mark.parametrize("kind", ["missing shard", "truncated shard", "index names a missing file"])
def test_bad_checkpoint_is_one_line_exit_2(kind, sharded_tiny, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(sharded_tiny, bad)
    name = _corrupt(kind, bad)
    code, out, err = run(capsys, *PRUNE, "--model", str(bad), "--out", str(tmp_path / "out"))
    assert code == 2 and err.startswith("error: ") and name in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_too_little_disk_is_one_line_exit_2(sharded_tiny, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    code, out, err = run(capsys, *PRUNE, "--model", str(sharded_tiny), "--out", str(tmp_path / "out"))
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "1.0 KB free" in errors[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def _cli(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def test_prune_killed_mid_run_resumes_at_the_block_and_matches(sharded_tiny, tmp_path):
    args = [*PRUNE, "--model", str(sharded_tiny), "--method", "sparsegpt", "--max-shard-size", "1MB"]
    ref = _cli(*args, "--out", str(tmp_path / "ref"))
    assert ref.wait(600) == 0, ref.stderr.read()
    victim = _cli(*args, "--out", str(tmp_path / "out"), env={"DLP_ENGINE_PAUSE": "prune:3:120"})
    journal = tmp_path / ".out.state" / "prune" / "journal.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (journal.exists() and json.loads(journal.read_text())["done"] >= 2):
        time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert json.loads(journal.read_text())["done"] == 2  # blocks 0..2 finished before the kill
    again = _cli(*args, "--out", str(tmp_path / "out"))
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    pruned = [line for line in err.splitlines() if line.startswith("prune: block")]
    assert pruned == ["prune: block 4/6", "prune: block 5/6", "prune: block 6/6"], err  # resumed at block 3 (0-based)
    a, b = CheckpointReader(tmp_path / "ref"), CheckpointReader(tmp_path / "out")
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.get(k), b.get(k)) for k in a.tensors)


def test_eval_past_max_memory_runs_offloaded_with_the_same_accuracy(sharded_tiny, tmp_path, capsys):
    common = ("eval", "--model", str(sharded_tiny), "--tasks", "arc_easy", "--limit", "4", "--json")
    code, out, err = run(capsys, *common)
    assert code in (0, None), err
    code, out2, err = run(capsys, *common, "--max-memory", "1MB", "--offload-dir", str(tmp_path / "offload"))
    assert code in (0, None), err
    assert json.loads(out)["tasks"]["arc_easy"]["acc"] == json.loads(out2)["tasks"]["arc_easy"]["acc"]
    from dlp.models import load_model

    net, _tok, _ref = load_model(str(sharded_tiny), max_memory=2**20, offload_dir=tmp_path / "offload")
    assert "disk" in set(net.hf_device_map.values())  # accelerate really kept weights off memory
