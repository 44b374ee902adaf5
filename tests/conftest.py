"""Shared fixtures. The real data folder is read through DLP_DATA_DIR (default: ../shared/data beside
the project root); the real model is the bundled SmolLM2-135M, converted once into DLP_CACHE_DIR."""
from __future__ import annotations

from tests.conftest_pipeline import *  # noqa: F401,F403  (isolates PREFECT_HOME before prefect is imported)

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("DLP_DATA_DIR") or ROOT.parent / "shared" / "data").resolve()
REFERENCE_DIR = Path(os.environ.get("DLP_REFERENCE_DIR") or ROOT.parent / "shared" / "reference").resolve()
os.environ["DLP_DATA_DIR"] = str(DATA_DIR)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, os.cpu_count() or 1))


def pytest_configure(config):
    if not DATA_DIR.is_dir():
        raise pytest.UsageError(f"real data folder {DATA_DIR} not found: set DLP_DATA_DIR to the shared data folder")


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer, ref) of the bundled SmolLM2-135M, dense, loaded once per session. Tests that
    modify weights must work on a copy (see ``fresh_smollm``)."""
    from dlp.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture()
def fresh_smollm(smollm):
    """A dense copy of the real model that a test may prune."""
    from dlp.models import load_model

    return load_model(smollm[2])


@pytest.fixture(scope="session")
def ref_windows(smollm):
    """The reference calibration: 32 x 512 windows of wikitext-2/valid.txt, seed 0."""
    from dlp import data

    return data.calibration_windows(smollm[1], data.load_text("wikitext2-valid"), 32, 512, 0)


@pytest.fixture(scope="session")
def ref_stats(smollm, ref_windows):
    from dlp.statistics import collect_statistics

    return collect_statistics(smollm[0], ref_windows)


@pytest.fixture(scope="session")
def test_ids(smollm):
    from dlp import data

    return data.evaluation_tokens(smollm[1], data.load_text("wikitext2"))
