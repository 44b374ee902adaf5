# Named to run last: it starts a Prefect server and a worker and leaves process-global MLflow state behind.
"""Deployments: prefect.yaml preparation, `dlp deploy` errors, and the real thing end to end -- a local
`prefect server`, `dlp deploy`, a `compress` flow run triggered through the API and executed by a
`prefect worker` (process pool) on a tiny model, then everything stopped."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from deployments import deploy as dep

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


@pytest.fixture(scope="module")
def cli():
    from cli import app
    from cli.ops_commands import register

    if "deploy" not in {c.name for c in app.registered_commands}:
        register(app)
    return app


# ============================================================================================ unit
def test_prefect_yaml_defines_the_three_deployments():
    doc = dep.load_deployments()
    by_name = {d["name"]: d for d in doc["deployments"]}
    assert set(by_name) == {"compress", "sweep", "watch-releases"}
    assert by_name["compress"]["entrypoint"] == "flows/compress.py:compress"
    assert by_name["compress"]["parameters"] == {"job_file": "configs/demo.yaml"}
    assert by_name["sweep"]["parameters"] == {"job_file": "configs/demo.yaml", "allocations": ["uniform", "owl", "dlp"]}
    watch = by_name["watch-releases"]
    assert watch["schedules"] == [{"cron": "0 3 * * *", "timezone": "UTC", "active": True}]
    assert watch["concurrency_limit"]["limit"] == 1
    assert all(d["work_pool"]["name"] == "dlp-process" for d in doc["deployments"])
    import ast

    for d in doc["deployments"]:  # every entrypoint exists and its parameters are arguments of the flow
        assert dep._entrypoint_problem(d["entrypoint"], ROOT) is None, d["entrypoint"]
        path, func = d["entrypoint"].split(":")
        fn = next(n for n in ast.parse((ROOT / path).read_text()).body if getattr(n, "name", None) == func)
        assert set(d.get("parameters") or {}) <= {a.arg for a in fn.args.args}, d["name"]


def test_prepare_prefect_file_overrides_and_skips(tmp_path):
    doc, skipped = dep.prepare_prefect_file(pool="gpu-box", cron="30 1 * * 1", timezone="Europe/Paris",
                                            names=["watch-releases", "compress"])
    assert [d["name"] for d in doc["deployments"]] == ["compress", "watch-releases"] and skipped == []
    assert {d["work_pool"]["name"] for d in doc["deployments"]} == {"gpu-box"}
    assert doc["deployments"][1]["schedules"][0] == {"cron": "30 1 * * 1", "timezone": "Europe/Paris", "active": True}
    assert "definitions" not in doc
    # the original file is untouched (pool of another deployment in the shared anchor)
    assert dep.load_deployments()["deployments"][0]["work_pool"]["name"] == "dlp-process"
    # a project without flows/sweep.py: that deployment is skipped, with the reason
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "compress.py").write_text("def compress(job=None):\n    pass\n")
    (tmp_path / "flows" / "watch.py").write_text("def other():\n    pass\n")
    doc, skipped = dep.prepare_prefect_file(project_dir=tmp_path)
    assert [d["name"] for d in doc["deployments"]] == ["compress"]
    assert skipped == [{"name": "sweep", "reason": "flows/sweep.py does not exist yet"},
                       {"name": "watch-releases", "reason": "flows/watch.py defines no function watch_releases()"}]
    with pytest.raises(dep.DeployError, match="no deployment named nope"):
        dep.prepare_prefect_file(names=["nope"])


def test_deploy_errors_are_one_line(cli, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    res = CliRunner().invoke(cli, ["deploy"])
    assert res.exit_code == 2 and res.stderr.startswith("error: PREFECT_API_URL is not set")
    res = CliRunner().invoke(cli, ["deploy", "--api-url", f"http://127.0.0.1:{_free_port()}/api"])
    assert res.exit_code == 2 and "no Prefect server answers at" in res.stderr
    assert res.stderr.count("\n") == 1
    res = CliRunner().invoke(cli, ["deploy", "--api-url", "http://127.0.0.1:9/api", "--cron", "every day"])
    assert res.exit_code == 2 and "not a valid cron expression" in res.stderr


# ============================================================================================ end to end
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except Exception:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@pytest.fixture
def prefect_server(tmp_path):
    """A real `prefect server start` on a free port with its own PREFECT_HOME; yields (api_url, base env)."""
    port = _free_port()
    home = tmp_path / "server-home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true",
                "PREFECT_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"})
    log = tmp_path / "server.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"prefect server did not start:\n{_tail(log)}")
            time.sleep(0.5)
        yield api, env
    finally:
        _stop(proc)


def test_deploy_and_run_compress_through_a_worker(prefect_server, cli, tmp_path):
    api, base_env = prefect_server
    t0 = time.time()
    pool = f"dlp-test-{uuid.uuid4().hex[:6]}"
    res = CliRunner().invoke(cli, ["deploy", "--api-url", api, "--pool", pool])
    assert res.exit_code == 0, res.stderr + res.stdout
    assert f"work pool {pool}, created" in res.stdout
    for name in ("compress/compress", "sweep/sweep", "watch-releases/watch-releases"):
        assert name in res.stdout
    assert "schedule: 0 3 * * *" in res.stdout
    print(f"[e2e] deploy {time.time() - t0:.1f}s")
    c = httpx.Client(base_url=api + "/", timeout=15)
    assert c.get(f"v2/concurrency_limits/{dep.GLOBAL_LIMIT}").json()["limit"] == 1
    d = c.get("deployments/name/compress/compress").json()
    assert d["work_pool_name"] == pool and d["parameters"] == {"job_file": "configs/demo.yaml"}
    assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    # idempotent: deploying again updates the same deployment
    w = c.get("deployments/name/watch-releases/watch-releases").json()
    res = CliRunner().invoke(cli, ["deploy", "--api-url", api, "--pool", pool, "--only", "watch-releases"])
    assert res.exit_code == 0 and c.get("deployments/name/watch-releases/watch-releases").json()["id"] == w["id"]
    assert "sweep" not in res.stdout

    print(f"[e2e] redeploy {time.time() - t0:.1f}s")
    # a tiny demo job through the API
    from tests.conftest_pipeline import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "tiny")
    rnd = random.Random(0)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(f"w{rnd.randrange(124)}" for _ in range(20)) for _ in range(200)))
    db = tmp_path / "mlflow.db"
    job = {"name": "deploy-e2e", "model": {"source": str(ckpt)},
           "calibration": {"source": str(text), "nsamples": 4, "seqlen": 16},
           "pruning": {"sparsity": 0.5, "allocation": "dlp", "alpha": 0.15},
           "evaluation": {"perplexity": {"data": str(text), "seqlen": 16, "max_windows": 4}},
           "registry": {"experiment": "deploy-e2e", "tracking_uri": "sqlite:///" + db.as_posix()},
           "workdir": str(tmp_path / "work")}
    fr = c.post(f"deployments/{d['id']}/create_flow_run", json={"parameters": {"job": job, "job_file": None}})
    assert fr.status_code in (200, 201), fr.text
    run_id = fr.json()["id"]

    env = {**base_env, "PREFECT_HOME": str(tmp_path / "worker-home"), "PREFECT_API_URL": api,
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
           "PREFECT_LOGGING_LEVEL": "INFO"}
    log = tmp_path / "worker.log"
    with log.open("wb") as fh:
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", pool, "--type", "process"], env=env,
                                  stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    try:
        deadline = time.time() + 240
        state = None
        while time.time() < deadline:
            state = c.get(f"flow_runs/{run_id}").json()["state"]
            if state and state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert worker.poll() is None, f"worker exited:\n{_tail(log)}"
            time.sleep(1)
        assert state and state["type"] == "COMPLETED", f"{state}\n{_tail(log, 60)}"
        print(f"[e2e] flow run completed {time.time() - t0:.1f}s")
    finally:
        _stop(worker)
    # the flow run registered the variant, with lineage pointing at the tiny model
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    from pipeline import registry as reg

    client = reg.get_client("sqlite:///" + db.as_posix())
    versions = client.search_model_versions("name = 'tiny-dlp'")
    assert len(versions) == 1 and versions[0].tags["dlp.base_model"] == str(ckpt)
    assert versions[0].tags["dlp.flow_run_id"] == run_id


def test_k8s_gpu_template_renders_gpu_limits():
    from prefect.utilities.templating import apply_values

    from deployments.k8s_gpu_template import gpu_template

    default = {  # the shape of prefect-kubernetes' default base job template
        "job_configuration": {
            "command": "{{ command }}", "env": "{{ env }}", "namespace": "{{ namespace }}",
            "job_manifest": {"apiVersion": "batch/v1", "kind": "Job",
                             "metadata": {"namespace": "{{ namespace }}", "generateName": "{{ name }}-"},
                             "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [
                                 {"name": "prefect-job", "image": "{{ image }}", "args": "{{ command }}"}]}}}},
        },
        "variables": {"type": "object", "properties": {"image": {"type": "string"}, "namespace": {"type": "string"}}},
    }
    tpl = gpu_template(default)
    assert "gpu_count" not in default["variables"]["properties"]  # input untouched
    assert {"gpu_count", "node_selector", "tolerations", "image"} <= set(tpl["variables"]["properties"])
    rendered = apply_values(tpl["job_configuration"], {"gpu_count": 2, "node_selector": {"gpu": "h100"},
                                                       "tolerations": [], "image": "dlp:1", "namespace": "ml"})
    pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": 2}}
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"] == [] and pod["containers"][0]["image"] == "dlp:1"
    with pytest.raises(ValueError, match="not a kubernetes base job template"):
        gpu_template({"variables": {}})
