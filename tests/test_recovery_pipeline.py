"""The ``recover`` stage's edges: training states on an S3 store (moto), and bad recovery input ending as one
line with exit status 2 before anything runs. The recover stage in a whole compress flow (resume from the
stored state, registration, cache) is tested in tests/test_pipeline_flow.py on its module's base run."""

from __future__ import annotations

import pytest
import yaml

from tests.test_pipeline_cli import _one_error_line, cli  # noqa: F401 (fixture)
from tests.test_pipeline_flow import RECOVERY, tiny_job, tiny_model  # noqa: F401 (fixture)

pytest_plugins = ["tests.conftest_pipeline"]


def test_store_saver_keeps_the_newest_state_on_s3(s3_bucket, tmp_path):
    from pipeline.cache import StoreSpec
    from pipeline.stages.recover import StoreSaver

    spec = StoreSpec(uri=s3_bucket.prefix_uri("run"), workdir=str(tmp_path / "work"), endpoint_url=s3_bucket.endpoint_url)
    saver = StoreSaver(spec, "k" * 64)
    assert saver.latest() is None
    for step in (2, 4):
        state = tmp_path / f"state-{step}"
        state.mkdir()
        (state / "state.json").write_text(f'{{"step": {step}}}')
        saver.save(step, state)
    local = saver.latest()
    assert (local / "state.json").read_text() == '{"step": 4}'
    keys = spec.open().list_keys(saver.prefix)
    assert any("step-00000004" in k for k in keys) and not any("step-00000002" in k for k in keys)
    saver.clear()
    assert spec.open().list_keys(saver.prefix) == [] and saver.latest() is None


@pytest.mark.parametrize("recovery, needle", [
    ({"steps": 0}, "recovery.steps"),
    ({"lr": 0}, "recovery.lr"),
    ({"rank": 0}, "recovery.rank"),
    ({"target_modules": ["q_proj", "c_attn"]}, "target module 'c_attn' is not a linear"),
    ({"seqlen": 4096, "data": "SHORT"}, "has no 4096-token window"),
])
def test_bad_recovery_input_is_one_line_exit_2_before_training(cli, tiny_model, tmp_path, monkeypatch,  # noqa: F811
                                                               recovery, needle):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv("DLP_PIPELINE_TRACE", str(trace))
    short = tmp_path / "short.txt"
    short.write_text("A few words of training text.\n")
    rec = {**RECOVERY, **{k: (str(short) if v == "SHORT" else v) for k, v in recovery.items()}}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_job(tiny_model, tmp_path / "work", recovery=rec)))
    code, out, err, secs = cli("compress", "--config", str(job))
    assert code == 2 and out == "" and needle in _one_error_line(err) and secs < 15
    assert not trace.exists()  # no stage ran


def test_sweep_refuses_a_recovery_block_in_one_line(cli, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, out, err, secs = cli("sweep", "--set", "recovery.steps=4", "--workdir", str(tmp_path / "w"))
    assert code == 2 and out == "" and "dlp sweep does not run" in _one_error_line(err) and secs < 15


def test_quantizing_an_unmerged_adapter_is_refused_in_one_line(cli, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, out, err, secs = cli("compress", "--set", "recovery.merge=none", "--set", "quantization.bits=4",
                               "--workdir", str(tmp_path / "w"))
    assert code == 2 and out == "" and "quantization needs the adapter merged" in _one_error_line(err) and secs < 15
    assert not (tmp_path / "w").exists()
