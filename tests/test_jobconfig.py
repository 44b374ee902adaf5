"""Job file validation, overrides, the shipped configs, and the workdir preflight."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline.jobconfig import (
    DEMO_JOB,
    PAPER_JOBS,
    ZERO_SHOT_7,
    JobConfig,
    JobError,
    apply_overrides,
    derive_model_name,
    load_job,
    parse_overrides,
)
from pipeline.preflight import PreflightError, check_workdir, run_preflight

def _write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _err(path, overrides=None) -> str:
    with pytest.raises(JobError) as e:
        load_job(path, overrides or {})
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------------------------- defaults
def test_paper_defaults(monkeypatch):
    monkeypatch.delenv("DLP_DATA_DIR", raising=False)
    job = load_job(None)
    assert (job.calibration.nsamples, job.calibration.seqlen, job.calibration.seed) == (128, 2048, 0)
    assert job.calibration.source == "c4"
    p = job.pruning
    assert (p.method, p.allocation, p.sparsity, p.alpha, p.statistic) == ("wanda", "dlp", 0.7, 0.15, "median")
    assert (p.owl_m, p.owl_lambda, p.pattern, p.mode) == (5, 0.08, "unstructured", "sequential")
    assert job.model.source == "smollm2-135m" and job.model.trust_remote_code is False
    assert job.registry.model_name == "smollm2-135m-dlp"
    assert job.workdir == ".dlp-work" and job.data_dir is None
    assert job.storage_uri == (Path(".dlp-work").resolve() / "artifacts").as_uri()


def test_data_dir_from_env(monkeypatch):
    monkeypatch.setenv("DLP_DATA_DIR", "/srv/data")
    assert load_job(None).data_dir == "/srv/data"
    assert load_job(None, {"data_dir": "/other"}).data_dir == "/other"


def test_derive_model_name():
    assert derive_model_name("smollm2-135m") == "smollm2-135m-dlp"
    assert derive_model_name("meta-llama/Llama-2-7b-hf") == "llama-2-7b-hf-dlp"
    assert derive_model_name("/models/SmolLM2-135M-Instruct.Q8_0.gguf") == "smollm2-135m-instruct.q8_0-dlp"
    assert derive_model_name("./local/ckpt/") == "ckpt-dlp"


# --------------------------------------------------------------------------------------------- shipped configs
def test_demo_config():
    job = load_job(DEMO_JOB)
    assert job.model.source == "smollm2-135m" and job.model.device == "cpu"
    assert (job.calibration.source, job.calibration.nsamples, job.calibration.seqlen, job.calibration.seed) == ("c4", 32, 512, 0)
    p = job.pruning
    assert (p.method, p.allocation, p.sparsity, p.alpha, p.statistic, p.pattern, p.mode) == (
        "wanda", "dlp", 0.7, 0.15, "median", "unstructured", "sequential")
    ppl = job.evaluation.perplexity
    assert (ppl.data, ppl.seqlen, ppl.max_windows) == ("wikitext2", 512, 64)
    assert ppl.seqlen * ppl.max_windows == 32768


def test_paper_configs_validate():
    names = sorted(p.name for p in PAPER_JOBS)
    cells = [f"paper-llama2-7b-{m}-{a}.yaml" for m in ("wanda", "sparsegpt") for a in ("uniform", "owl", "dlp")]
    assert names == sorted([*cells, "paper-llama2-7b-wanda-dlp-recover.yaml"])
    for path in PAPER_JOBS:
        job = load_job(path)
        recover = path.stem.endswith("-recover")
        stem = path.stem.removesuffix("-recover").split("-")
        assert (job.recovery is not None) == recover
        assert (job.pruning.method, job.pruning.allocation) == (stem[-2], stem[-1])
        assert job.model.source == "meta-llama/Llama-2-7b-hf"
        assert (job.model.device, job.model.dtype) == ("cuda", "float16")
        assert job.pruning.sparsity == 0.7
        assert (job.calibration.nsamples, job.calibration.seqlen, job.calibration.source) == (128, 2048, "c4")
        assert (job.evaluation.perplexity.data, job.evaluation.perplexity.seqlen) == ("wikitext2", 2048)
        assert job.registry.model_name == "llama-2-7b-hf-dlp"
        if recover:  # the Wanda/OWL LoRA recipe, merged masked
            r = job.recovery
            assert (r.rank, r.alpha, r.dropout, r.lr, r.target_modules) == (8, 16, 0.05, 1e-4, ["q_proj", "v_proj"])
            assert (r.data, r.merge) == ("c4", "masked")


# --------------------------------------------------------------------------------------------- errors
def test_unknown_key_names_key_and_valid_keys(tmp_path):
    p = _write(tmp_path, "pruning:\n  alhpa: 0.2\n", "x.yaml")
    msg = _err(p)
    assert msg.startswith(f"job file {p}: unknown key 'pruning.alhpa'")
    assert "did you mean 'alpha'" in msg
    assert "(valid: allocation, alpha, method, mode, owl_lambda, owl_m, pattern, search, sparsity, statistic)" in msg


def test_unknown_section(tmp_path):
    msg = _err(_write(tmp_path, "modle:\n  source: x\n"))
    assert "unknown key 'modle'" in msg and "did you mean 'model'" in msg


def test_unknown_nested_key(tmp_path):
    msg = _err(_write(tmp_path, "evaluation:\n  perplexity:\n    windows: 3\n"))
    assert "unknown key 'evaluation.perplexity.windows'" in msg and "max_windows" in msg


def test_wrong_type_messages(tmp_path):
    p = _write(tmp_path, "pruning:\n  sparsity: high\n", "x.yaml")
    assert _err(p) == f"job file {p}: 'pruning.sparsity': expected a number in (0, 1), got 'high'"
    msg = _err(_write(tmp_path, "pruning:\n  sparsity: 1.5\n"))
    assert "'pruning.sparsity': expected a number in (0, 1), got 1.5" in msg
    msg = _err(_write(tmp_path, "pruning:\n  method: prune-it\n"))
    assert "'pruning.method': expected one of 'magnitude', 'wanda', 'sparsegpt', got 'prune-it'" in msg
    msg = _err(_write(tmp_path, "calibration:\n  nsamples: lots\n"))
    assert "'calibration.nsamples': expected an integer >= 1, got 'lots'" in msg
    msg = _err(_write(tmp_path, "model: smollm2-135m\n"))
    assert "'model': expected a mapping with keys" in msg
    msg = _err(_write(tmp_path, "model:\n  device: tpu\n"))
    assert "'model.device': expected one of 'cpu', 'cuda', got 'tpu'" in msg
    msg = _err(_write(tmp_path, "pruning:\n  alpha: 0.9\n"))
    assert "'pruning.alpha': expected a number in [0, 0.5) or 'auto', got 0.9" in msg


def test_several_problems_reported_on_one_line(tmp_path):
    msg = _err(_write(tmp_path, "pruning:\n  sparsity: high\n  alhpa: 1\n"))
    assert msg.count("\n") == 0
    assert "unknown key 'pruning.alhpa'" in msg and "(and 1 more: 'pruning.sparsity')" in msg


def test_yaml_problems(tmp_path):
    assert "invalid YAML at line 3" in _err(_write(tmp_path, "pruning:\n  sparsity: [0.7\n"))
    assert "duplicate key 'alpha'" in _err(_write(tmp_path, "pruning:\n  alpha: 0.1\n  alpha: 0.2\n"))
    assert "expected a mapping of sections" in _err(_write(tmp_path, "- a\n- b\n"))
    assert _err(tmp_path / "missing.yaml").endswith("missing.yaml: not found")
    assert load_job(_write(tmp_path, "# only comments\n")).pruning.alpha == 0.15


def test_yaml_nm_pattern_and_numbers(tmp_path):
    job = load_job(_write(tmp_path, "pruning:\n  pattern: 2:4\n  owl_lambda: 1e-2\n"))
    assert job.pruning.pattern == "2:4" and job.pruning.owl_lambda == 0.01


# --------------------------------------------------------------------------------------------- overrides
def test_overrides_applied_before_validation():
    job = load_job(DEMO_JOB, {"pruning.alpha": 0.2, "pruning.allocation": "owl", "calibration.nsamples": "16"})
    assert job.pruning.alpha == 0.2 and job.pruning.allocation == "owl" and job.calibration.nsamples == 16
    assert load_job(DEMO_JOB, {"pruning.alpha": "auto"}).pruning.alpha == "auto"
    job = load_job(None, {"evaluation.zero_shot.tasks": "zero-shot-7", "evaluation.perplexity": None})
    assert job.evaluation.zero_shot.resolved_tasks() == ZERO_SHOT_7 and job.evaluation.perplexity is None
    # creates missing sections, and a None section can be filled
    job = load_job(None, {"evaluation.perplexity": None, "storage.uri": "s3://b/p"})
    assert job.storage_uri == "s3://b/p"
    job = load_job(_write_none(), {"evaluation.perplexity.seqlen": 256})
    assert job.evaluation.perplexity.seqlen == 256


def _write_none() -> Path:
    import tempfile

    d = Path(tempfile.mkdtemp())
    return _write(d, "evaluation:\n  perplexity: null\n")


def test_override_errors_are_marked():
    msg = _err(DEMO_JOB, {"pruning.alhpa": 0.2})
    assert "unknown key 'pruning.alhpa' (set by override)" in msg
    msg = _err(DEMO_JOB, {"pruning.sparsity": "high"})
    assert "'pruning.sparsity' (set by override): expected a number in (0, 1), got 'high'" in msg
    msg = _err(DEMO_JOB, {"pruning.method.x": 1})
    assert "'pruning.method' is 'wanda', not a section" in msg


def test_parse_overrides():
    got = parse_overrides(["pruning.alpha=0.2", "pruning.pattern=2:4", "pruning.alpha2=auto",
                           "evaluation.zero_shot.tasks=[piqa, boolq]", "evaluation.perplexity.max_windows=null",
                           "model.source=meta-llama/Llama-2-7b-hf"])
    assert got == {"pruning.alpha": 0.2, "pruning.pattern": "2:4", "pruning.alpha2": "auto",
                   "evaluation.zero_shot.tasks": ["piqa", "boolq"], "evaluation.perplexity.max_windows": None,
                   "model.source": "meta-llama/Llama-2-7b-hf"}
    with pytest.raises(JobError, match="KEY=VALUE"):
        parse_overrides(["pruning.alpha"])


def test_apply_overrides_does_not_mutate():
    data = {"pruning": {"alpha": 0.1}}
    out = apply_overrides(data, {"pruning.alpha": 0.3})
    assert data == {"pruning": {"alpha": 0.1}} and out == {"pruning": {"alpha": 0.3}}


# --------------------------------------------------------------------------------------------- helpers
def test_hashes_and_params_are_stable():
    a = load_job(DEMO_JOB)
    b = load_job(DEMO_JOB, {"pruning.alpha": 0.2})
    assert a.section_hash("model", "calibration") == b.section_hash("model", "calibration")
    assert a.section_hash("pruning") != b.section_hash("pruning")
    assert a.section_hash("pruning.alpha") == load_job(DEMO_JOB).section_hash("pruning.alpha")
    with pytest.raises(KeyError):
        a.section_hash("nope")
    flat = a.flat_params()
    assert flat["pruning.alpha"] == "0.15" and flat["calibration.nsamples"] == "32"
    assert all(isinstance(v, str) for v in flat.values())
    assert a.variant_name() == "wanda-dlp-p0.7-a0.15-median-unstructured"
    assert JobConfig.model_validate(a.model_dump()) == a
    assert load_job(_write_dump(a)) == a


def _write_dump(job: JobConfig) -> Path:
    import tempfile

    return _write(Path(tempfile.mkdtemp()), job.to_yaml())


# --------------------------------------------------------------------------------------------- preflight
def test_preflight_workdir_ok(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = load_job(None, {"workdir": str(tmp_path / "w"), "registry.tracking_uri": None})
    lines = run_preflight(job)
    assert any("workdir" in line for line in lines) and any("SQLite" in line for line in lines)
    assert (tmp_path / "w").is_dir()


def test_preflight_workdir_not_writable(tmp_path):
    """A read-only folder for ordinary users; root ignores permission bits, so as root a path under /sys
    (a filesystem nobody may create folders in) stands in for it."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    target = Path("/sys/dlp-preflight-probe/work") if os.geteuid() == 0 else ro / "work"
    try:
        with pytest.raises(PreflightError, match="not writable") as e:
            check_workdir(target)
        assert str(target) in str(e.value) and "workdir:" in str(e.value) and "\n" not in str(e.value)
    finally:
        ro.chmod(stat.S_IRWXU)


def test_preflight_workdir_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(PreflightError) as e:
        check_workdir(f)
    assert "workdir" in str(e.value) and "\n" not in str(e.value)


# -- the schema's bounds are the library's (dlp.bounds): what dlp refuses, the job file refuses at load time
@pytest.mark.parametrize("key,value", [
    ("pruning.sparsity", 0.0), ("pruning.sparsity", 1.0), ("pruning.alpha", 0.5), ("pruning.alpha", -0.01),
    ("pruning.owl_lambda", 0.5), ("pruning.owl_m", 0.0), ("calibration.nsamples", 0), ("calibration.seqlen", 1),
    ("evaluation.perplexity.seqlen", 1), ("pruning.search.heldout", 1),
])
def test_every_value_the_library_refuses_is_refused_by_the_schema(key, value):
    from dlp import bounds
    from dlp.errors import DLPError

    rng = {"pruning.sparsity": bounds.SPARSITY, "pruning.alpha": bounds.ALPHA, "pruning.owl_lambda": bounds.OWL_LAMBDA,
           "pruning.owl_m": bounds.OWL_M, "calibration.nsamples": bounds.NSAMPLES, "calibration.seqlen": bounds.SEQLEN,
           "evaluation.perplexity.seqlen": bounds.SEQLEN, "pruning.search.heldout": bounds.HELDOUT}[key]
    with pytest.raises(DLPError):
        rng.check(value)
    with pytest.raises(JobError, match=f"'{key}' \\(set by override\\): expected"):
        load_job(DEMO_JOB, {key: value})


@pytest.mark.parametrize("key,value", [("pruning.sparsity", 0.01), ("pruning.sparsity", 0.99), ("pruning.alpha", 0.0),
                                       ("pruning.alpha", 0.49), ("pruning.owl_lambda", 0.0)])
def test_values_inside_the_library_bounds_load(key, value):
    assert load_job(DEMO_JOB, {key: value}) is not None


def test_bad_bounds_job_fails_in_one_line_with_exit_2_before_any_stage(tmp_path):
    """`dlp compress` with alpha 0.5 (outside [0, 0.5)): one line, exit 2, and nothing was fetched or written."""
    import subprocess
    import sys

    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, "-c", "from cli import main; main()", "compress", "--workdir", str(work),
                           "--set", "pruning.alpha=0.5"], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "'pruning.alpha' (set by override): expected a number in [0, 0.5) or 'auto', got 0.5" in proc.stderr
    assert not work.exists()


@pytest.mark.parametrize("key,value", [("resources.memory_budget", "lots"), ("resources.max_shard_size", "-3GB"),
                                       ("resources.memory_budget", "0")])
def test_bad_resource_sizes_are_one_line_naming_the_key_and_the_format(key, value):
    with pytest.raises(JobError) as e:
        load_job(DEMO_JOB, {key: value})
    text = str(e.value)
    assert f"'{key}'" in text and "\n" not in text and ("8GB" in text or "positive" in text)


def test_resource_sizes_parse_to_bytes():
    job = load_job(DEMO_JOB, {"resources.memory_budget": "512MiB"})
    assert job.resources.budget_bytes() == 512 * 2**20 and job.resources.max_shard_size == "5GB"


def test_preflight_refuses_a_work_dir_without_room_for_the_pruned_checkpoint(tmp_path, monkeypatch):
    """Checked after fetch, before statistics: the pruned checkpoint (twice with a local store) + the states."""
    import shutil
    from types import SimpleNamespace

    from pipeline.preflight import check_disk_for_model
    from tests.test_pipeline_flow import make_tiny_model

    model = make_tiny_model(tmp_path / "model", layers=2)
    job = load_job(DEMO_JOB, {"workdir": str(tmp_path / "work")})
    assert "needed" in check_disk_for_model(job, str(model), "float32")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**6, used=10**6 - 4096, free=4096))
    with pytest.raises(PreflightError) as e:
        check_disk_for_model(job, str(model), "float32")
    assert "free disk space" in str(e.value) and "\n" not in str(e.value)
