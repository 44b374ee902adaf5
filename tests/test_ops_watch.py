"""Release sources and the watch-releases flow (local release folder, offline).

A fake compress (registers the snapshot with tasks/registry.log_variant_run) stands in where the real flow
is not the point; ``test_watch_with_real_compress`` runs flows/compress.py end to end on a tiny model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from pipeline import registry as reg
from pipeline.jobconfig import JobError, load_job
from pipeline.releases import HubSource, LocalFolderSource, ReleaseError, make_source


# ============================================================================================ helpers
def add_snapshot(releases: Path, ckpt: Path, name: str, *, mtime: float, revision: str | None = None) -> Path:
    """Copy the tiny checkpoint in as a snapshot the way a sync job should: hidden name, then rename."""
    tmp = releases / f".{name}.partial"
    shutil.copytree(ckpt, tmp)
    if revision:
        (tmp / "revision.txt").write_text(f"# synced\n{revision}\n")
    final = releases / name
    os.replace(tmp, final)
    for p in [*final.iterdir(), final]:
        os.utime(p, (mtime, mtime))
    return final


def tiny_job(tmp: Path, work: Path) -> Path:
    rnd = random.Random(0)
    text = tmp / "text.txt"
    text.write_text("\n".join(" ".join(f"w{rnd.randrange(124)}" for _ in range(20)) for _ in range(200)))
    job = {
        "name": "tiny-watch",
        "model": {"source": "placeholder-set-by-watch"},
        "calibration": {"source": str(text), "nsamples": 4, "seqlen": 16},
        "pruning": {"method": "wanda", "allocation": "dlp", "sparsity": 0.5, "alpha": 0.15},
        "evaluation": {"perplexity": {"data": str(text), "seqlen": 16, "max_windows": 4}},
        "registry": {"experiment": "watch-test"},
        "workdir": str(work),
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def write_config(tmp: Path, entries: list[dict], work: Path) -> Path:
    cfg = tmp / "watch.yaml"
    cfg.write_text(yaml.safe_dump({"workdir": str(work), "models": entries}))
    return cfg


class FakeCompress:
    """Stands in for flows.compress.compress: registers the snapshot as a version tagged like the pipeline."""

    def __init__(self, delay: float = 0.0, hub_checkpoint: Path | None = None):
        self.hub_checkpoint = hub_checkpoint  # what a hub repo id "downloads" to
        self.calls: list[dict] = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, job_file, overrides):
        with self.lock:
            self.calls.append({"job_file": job_file, "overrides": dict(overrides)})
        job = load_job(job_file, overrides)
        time.sleep(self.delay)
        ckpt = job.model.source if Path(job.model.source).is_dir() else self.hub_checkpoint
        res = reg.log_variant_run(
            registered_name=job.registry.model_name, variant_key=f"fake-{job.model.revision}",
            checkpoint_dir=ckpt,
            metrics={"ppl.pruned": 30.0, "ppl.dense": 20.0, "ppl.ratio": 1.5, "sparsity.achieved": 0.5},
            block_sparsity=[0.45, 0.55],
            lineage={"base_model": job.model.source, "base_revision": job.model.revision, "method": "wanda",
                     "allocation": "dlp", "sparsity": 0.5},
            experiment=job.registry.experiment, run_name=f"fake-{job.model.revision}", pip_requirements=["torch"],
        )
        return {"registered_name": res["name"], "version": res["version"], "pruned_ppl": 30.0,
                "achieved_sparsity": 0.5, "base_model": {"source": job.model.source, "revision": job.model.revision}}


@pytest.fixture
def watch_env(tmp_path, mlflow_tracking, tiny_hf_checkpoint):
    releases = tmp_path / "tiny-llama"
    releases.mkdir()
    work = tmp_path / "work"
    job = tiny_job(tmp_path, work)
    return SimpleNamespace(tmp=tmp_path, releases=releases, work=work, job=job, ckpt=tiny_hf_checkpoint,
                           uri=mlflow_tracking.uri)


# ============================================================================================ sources
def test_local_source_latest_by_mtime_name_and_revision_file(tmp_path, tiny_hf_checkpoint):
    root = tmp_path / "rel"
    root.mkdir()
    src = LocalFolderSource(root)
    assert src.latest() is None
    add_snapshot(root, tiny_hf_checkpoint, "b-first", mtime=1000)
    add_snapshot(root, tiny_hf_checkpoint, "a-second", mtime=2000, revision="sha-222")
    (root / ".c-partial").mkdir()  # in-progress copy: ignored
    (root / "_tmp").mkdir()
    (root / "zz-no-config").mkdir()  # not a model snapshot: ignored
    latest = src.latest()
    assert (latest.kind, latest.revision, Path(latest.source).name) == ("local", "sha-222", "a-second")
    assert latest.origin == str(root.resolve())
    by_name = LocalFolderSource(root, order="name").latest()
    assert (Path(by_name.source).name, by_name.revision) == ("b-first", "b-first")
    assert [p.name for p in src.snapshots()] == ["b-first", "a-second"]
    with pytest.raises(ReleaseError, match="does not exist"):
        LocalFolderSource(tmp_path / "nope").latest()
    with pytest.raises(ReleaseError, match="order must be"):
        LocalFolderSource(root, order="size")


def test_hub_source_and_factory():
    class FakeApi:
        def __init__(self):
            self.asked = []

        def model_info(self, repo_id, revision=None):
            self.asked.append((repo_id, revision))
            if repo_id == "org/missing":
                raise RuntimeError("404 Client Error: Repository Not Found")
            return SimpleNamespace(sha="0123abcd" * 5, last_modified=datetime(2025, 6, 1, tzinfo=timezone.utc))

    api = FakeApi()
    rel = HubSource("org/model", api=api).latest()
    assert (rel.kind, rel.source, rel.revision, rel.extra["branch"]) == ("hub", "org/model", "0123abcd" * 5, "main")
    assert rel.modified == datetime(2025, 6, 1, tzinfo=timezone.utc).timestamp() and api.asked == [("org/model", "main")]
    with pytest.raises(ReleaseError, match=r"hub repo org/missing@main: cannot read model info \(RuntimeError: 404"):
        HubSource("org/missing", api=api).latest()
    src = make_source({"hub": "org/model", "revision": "dev"}, hub_api_factory=lambda: api)
    assert src.latest().extra["branch"] == "dev" and src.describe() == "hub:org/model@dev"
    for bad, msg in [({"hub": "nouser"}, "expected a repo id"), ({"hub": "a/b", "local": "/x"}, "either"),
                     ({"hub": "a/b", "branch": "x"}, "unknown key"), ({"s3": "x"}, "needs 'hub"), ("x", "mapping")]:
        with pytest.raises(ReleaseError, match=msg):
            make_source(bad)


def test_watch_config_errors(tmp_path):
    from flows.watch import load_watch_config

    def cfg(doc):
        p = tmp_path / "w.yaml"
        p.write_text(yaml.safe_dump(doc))
        return p

    good = {"name": "a", "source": {"local": "/x"}, "job": "j.yaml"}
    c, _ = load_watch_config(cfg({"models": [good]}))
    assert c.models[0].report and c.workdir == ".dlp-work"
    for doc, msg in [({"models": [good, good]}, "duplicate watch entry name"),
                     ({"models": [{**good, "jobb": 1}]}, r"models\.0\.jobb: Extra inputs"),
                     ({"models": [{**good, "source": {"ftp": 1}}]}, "needs 'hub: org/name' or 'local"),
                     ({"modelz": []}, "modelz")]:
        with pytest.raises(JobError, match=msg) as ei:
            load_watch_config(cfg(doc))
        assert "\n" not in str(ei.value)
    with pytest.raises(JobError, match="not found"):
        load_watch_config(tmp_path / "missing.yaml")


def test_release_lock_is_exclusive_and_released(tmp_path):
    from flows.watch import release_lock

    with release_lock(tmp_path / "locks", "m|local:/x|r1") as first:
        assert first
        with release_lock(tmp_path / "locks", "m|local:/x|r1") as second:
            assert not second  # same release, held elsewhere (another thread or process)
        with release_lock(tmp_path / "locks", "m|local:/x|r2") as other:
            assert other  # another release is independent
    with release_lock(tmp_path / "locks", "m|local:/x|r1") as again:
        assert again  # released on exit


def test_shipped_watch_config_is_valid():
    from flows.watch import load_watch_config

    cfg, _ = load_watch_config(Path(__file__).resolve().parents[1] / "configs" / "watch.yaml")
    assert cfg.models and all(make_source(e.source) for e in cfg.models)


# ============================================================================================ the flow
def test_watch_compresses_each_release_once(prefect_harness, watch_env, monkeypatch):
    from flows import watch
    from prefect.client.orchestration import get_client

    fake = FakeCompress()
    monkeypatch.setattr(watch, "run_compress", fake)
    env = watch_env
    cfg = write_config(env.tmp, [{"name": "tiny", "source": {"local": str(env.releases)}, "job": str(env.job),
                                  "promote_gate": "ppl_ratio<=2,sparsity>=0.4", "report": True}], env.work)

    out = watch.watch_releases(config=str(cfg))
    assert out == [{"name": "tiny", "status": "no-release", "source": f"local:{env.releases}"}]

    add_snapshot(env.releases, env.ckpt, "rev-001", mtime=1000)
    out = watch.watch_releases(config=str(cfg))
    assert [(o["status"], o["revision"], o["registered_name"], o["version"]) for o in out] == [
        ("compressed", "rev-001", "tiny-llama-dlp", "1")]
    assert len(fake.calls) == 1
    ov = fake.calls[0]["overrides"]
    assert ov["model.source"] == str((env.releases / "rev-001").resolve()) and ov["model.revision"] == "rev-001"
    assert ov["registry.model_name"] == "tiny-llama-dlp" and fake.calls[0]["job_file"] == str(env.job)
    client = reg.get_client()
    tags = client.get_model_version("tiny-llama-dlp", "1").tags
    assert tags["dlp.release_revision"] == "rev-001" and tags["dlp.watch_entry"] == "tiny"
    assert tags["dlp.release_source"] == f"local:{env.releases.resolve()}" and tags["dlp.watch_flow_run_id"]
    # after-compress: gate promotion + report (file, MLflow, Prefect artifact)
    assert out[0]["champion"] == 1 and Path(out[0]["report"]).is_file()
    assert str(client.get_model_version_by_alias("tiny-llama-dlp", "champion").version) == "1"
    with get_client(sync_client=True) as pc:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        arts = pc.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dlp-report-tiny-llama-dlp"])))
    assert arts and "DLP report: tiny-llama-dlp" in arts[0].data

    # again: nothing to do
    out = watch.watch_releases(config=str(cfg))
    assert [(o["status"], o["version"]) for o in out] == [("up-to-date", "1")] and len(fake.calls) == 1
    # an older snapshot appearing later does not count as a release; a newer one does
    add_snapshot(env.releases, env.ckpt, "rev-000", mtime=500)
    assert watch.watch_releases(config=str(cfg))[0]["status"] == "up-to-date"
    add_snapshot(env.releases, env.ckpt, "rev-002", mtime=2000, revision="abc123")
    out = watch.watch_releases(config=str(cfg), dry_run=True)
    assert [(o["status"], o["revision"]) for o in out] == [("new", "abc123")] and len(fake.calls) == 1
    out = watch.watch_releases(config=str(cfg))
    assert [(o["status"], o["revision"], o["version"]) for o in out] == [("compressed", "abc123", "2")]
    assert len(fake.calls) == 2


def test_watch_hub_source_follows_the_branch_sha(prefect_harness, watch_env, monkeypatch):
    import huggingface_hub

    from flows import watch

    head = {"sha": "a" * 40}

    class FakeHfApi:  # HfApi().model_info(repo, revision=branch).sha, offline
        def __init__(self, token=None):
            pass

        def model_info(self, repo_id, revision=None):
            assert (repo_id, revision) == ("org/Tiny-Model", "main")
            return SimpleNamespace(sha=head["sha"], last_modified=None)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    fake = FakeCompress(hub_checkpoint=watch_env.ckpt)
    monkeypatch.setattr(watch, "run_compress", fake)
    cfg = write_config(watch_env.tmp, [{"name": "hub", "source": {"hub": "org/Tiny-Model"}, "job": str(watch_env.job),
                                        "report": False}], watch_env.work)
    out = watch.watch_releases(config=str(cfg))
    assert [(o["status"], o["registered_name"], o["revision"]) for o in out] == [("compressed", "tiny-model-dlp", "a" * 40)]
    assert fake.calls[0]["overrides"]["model.source"] == "org/Tiny-Model"
    assert fake.calls[0]["overrides"]["model.revision"] == "a" * 40
    assert watch.watch_releases(config=str(cfg))[0]["status"] == "up-to-date" and len(fake.calls) == 1
    head["sha"] = "b" * 40  # a new commit on main
    out = watch.watch_releases(config=str(cfg))
    assert [(o["status"], o["version"]) for o in out] == [("compressed", "2")] and len(fake.calls) == 2


def test_two_concurrent_watch_runs_compress_once(prefect_harness, watch_env, monkeypatch):
    from flows import watch
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with get_client(sync_client=True) as pc:  # what `dlp deploy` creates: exercised by the compressing run
        try:
            pc.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=watch.GLOBAL_LIMIT, limit=1))
        except Exception:  # created by an earlier test in this session
            pass
    fake = FakeCompress(delay=4.0)
    monkeypatch.setattr(watch, "run_compress", fake)
    env = watch_env
    add_snapshot(env.releases, env.ckpt, "rev-100", mtime=1000)
    cfg = write_config(env.tmp, [{"name": "tiny", "source": {"local": str(env.releases)}, "job": str(env.job),
                                  "report": False}], env.work)
    results: list = [None, None]

    def run(i):
        results[i] = watch.watch_releases(config=str(cfg))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    statuses = sorted(r[0]["status"] for r in results)
    assert len(fake.calls) == 1, statuses
    assert statuses in (["compressed", "in-progress"], ["compressed", "up-to-date"])
    assert len(reg.get_client().search_model_versions("name = 'tiny-llama-dlp'")) == 1


def test_watch_errors_are_isolated_and_cli(prefect_harness, watch_env, monkeypatch):
    from cli import app
    from flows import watch
    from cli.ops_commands import register

    if "watch" not in {c.name for c in app.registered_commands}:
        register(app)
    fake = FakeCompress()
    monkeypatch.setattr(watch, "run_compress", fake)
    env = watch_env
    add_snapshot(env.releases, env.ckpt, "rev-7", mtime=1000)
    cfg = write_config(env.tmp, [
        {"name": "gone", "source": {"local": str(env.tmp / "no-such-folder")}, "job": str(env.job)},
        {"name": "off", "source": {"local": str(env.releases)}, "job": str(env.job), "enabled": False},
        {"name": "tiny", "source": {"local": str(env.releases)}, "job": str(env.job), "registered_name": "custom-name",
         "report": False},
    ], env.work)
    with pytest.raises(RuntimeError, match="1 of 3 watched model.* failed: gone: local release folder"):
        watch.watch_releases(config=str(cfg))
    assert len(fake.calls) == 1 and fake.calls[0]["overrides"]["registry.model_name"] == "custom-name"

    runner = CliRunner()
    res = runner.invoke(app, ["watch", "--config", str(cfg), "--dry-run"])
    assert res.exit_code == 2
    assert res.stderr.strip().startswith("error: 1 of 3 watched model(s) failed: gone: local release folder")
    lines = {ln.split()[0]: ln.split()[1] for ln in res.stdout.splitlines()}
    assert lines == {"gone": "error", "off": "disabled", "tiny": "up-to-date"}
    res = runner.invoke(app, ["watch", "--config", str(cfg), "--only", "tiny", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)[0]["version"] == "1"
    res = runner.invoke(app, ["watch", "--config", str(cfg), "--only", "nope"])
    assert res.exit_code == 2 and "no watch entry named nope" in res.stderr
    res = runner.invoke(app, ["watch", "--config", str(env.tmp / "missing.yaml")])
    assert res.exit_code == 2 and res.stderr.startswith("error: job file") and "not found" in res.stderr


def test_watch_with_real_compress(prefect_harness, watch_env):
    """The real flows/compress.py on a tiny snapshot: the pipeline's dlp.base_revision tag is what the watcher
    finds on the next run."""
    from flows import watch

    env = watch_env
    add_snapshot(env.releases, env.ckpt, "2025-06-01-r1", mtime=1000)
    cfg = write_config(env.tmp, [{"name": "tiny", "source": {"local": str(env.releases)}, "job": str(env.job),
                                  "promote_gate": "sparsity>=0.4", "report": True}], env.work)
    out = watch.watch_releases(config=str(cfg))
    assert [(o["status"], o["revision"], o["version"]) for o in out] == [("compressed", "2025-06-01-r1", "1")]
    assert 0.4 < out[0]["achieved_sparsity"] < 0.6 and out[0]["champion"] == 1
    client = reg.get_client()
    mv = client.get_model_version("tiny-llama-dlp", "1")
    assert mv.tags["dlp.base_revision"] == "2025-06-01-r1" and mv.tags["dlp.release_revision"] == "2025-06-01-r1"
    assert mv.tags["dlp.method"] == "wanda" and mv.tags["dlp.allocation"] == "dlp"
    from pipeline.promotion import load_variants

    v = load_variants("tiny-llama-dlp")[0]
    assert v.ppl and v.dense_ppl and v.ppl_ratio == pytest.approx(v.ppl / v.dense_ppl) and len(v.per_block) == 2
    out = watch.watch_releases(config=str(cfg))
    assert [(o["status"], o["version"]) for o in out] == [("up-to-date", "1")]
