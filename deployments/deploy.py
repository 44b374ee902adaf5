"""Register the pipeline's deployments (``deployments/prefect.yaml``) against a running Prefect server.

``dlp deploy`` calls :func:`deploy`, which

1. checks the server (``$PREFECT_API_URL`` or ``api_url``) answers ``/health``;
2. creates the work pool (type ``process``, default ``dlp-process``) and the global concurrency limit
   ``dlp-release-compression`` (limit 1; the watch flow holds a slot while it compresses a release) when missing;
3. runs ``prefect --no-prompt deploy --all --prefect-file <copy of prefect.yaml>`` from the project root, the copy
   carrying the chosen pool name, cron and timezone, and only the selected deployments whose entrypoint exists;
4. reads the deployments back from the server.

The same deployments can be registered by hand with ``prefect deploy --all --prefect-file deployments/prefect.yaml``
(after creating the pool). Nothing here imports prefect at module import time.
"""

from __future__ import annotations

import ast
import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = Path(__file__).resolve().parent / "prefect.yaml"
DEFAULT_POOL = "dlp-process"
DEFAULT_CRON = "0 3 * * *"
WATCH_DEPLOYMENT = "watch-releases"
GLOBAL_LIMIT = "dlp-release-compression"  # keep in sync with flows.watch.GLOBAL_LIMIT

__all__ = ["DeployError", "deploy", "load_deployments", "prepare_prefect_file"]


class DeployError(RuntimeError):
    """One-line reason why the deployments could not be registered."""


def load_deployments(prefect_file: str | os.PathLike[str] = PREFECT_FILE) -> dict[str, Any]:
    try:
        return yaml.safe_load(Path(prefect_file).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise DeployError(f"{prefect_file} not found") from None
    except yaml.YAMLError as e:
        raise DeployError(f"{prefect_file}: invalid YAML ({str(e).splitlines()[0]})") from None


def _entrypoint_problem(entrypoint: str, project_dir: Path) -> str | None:
    """None when ``path.py:function`` exists, else why not (cheap AST check, nothing is imported)."""
    path, _, func = entrypoint.rpartition(":")
    file = project_dir / path
    if not file.is_file():
        return f"{path} does not exist yet"
    try:
        tree = ast.parse(file.read_text(encoding="utf-8"))
    except SyntaxError as e:
        return f"{path} does not parse ({e.msg}, line {e.lineno})"
    if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == func for n in tree.body):
        return f"{path} defines no function {func}()"
    return None


def prepare_prefect_file(
    *,
    pool: str = DEFAULT_POOL,
    cron: str | None = None,
    timezone: str | None = None,
    names: Sequence[str] | None = None,
    prefect_file: str | os.PathLike[str] = PREFECT_FILE,
    project_dir: str | os.PathLike[str] = ROOT,
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """(the prefect.yaml document to deploy, skipped deployments with reasons)."""
    doc = copy.deepcopy(load_deployments(prefect_file))
    deployments = doc.get("deployments") or []
    known = [d.get("name") for d in deployments]
    if names:
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise DeployError(f"no deployment named {', '.join(unknown)} in {prefect_file} (known: {', '.join(known)})")
    chosen, skipped = [], []
    for d in deployments:
        if names and d.get("name") not in names:
            continue
        problem = _entrypoint_problem(d.get("entrypoint", ""), Path(project_dir))
        if problem:
            skipped.append({"name": d.get("name"), "reason": problem})
            continue
        d = copy.deepcopy(d)
        d.setdefault("work_pool", {})["name"] = pool
        if d.get("name") == WATCH_DEPLOYMENT:
            for sched in d.get("schedules") or []:
                if cron:
                    sched["cron"] = cron
                if timezone:
                    sched["timezone"] = timezone
        chosen.append(d)
    doc["deployments"] = chosen
    doc.pop("definitions", None)  # anchors were resolved by the YAML loader
    return doc, skipped


# ============================================================================================ server API
def _api(api_url: str):
    import httpx

    return httpx.Client(base_url=api_url.rstrip("/") + "/", timeout=15.0)


def check_server(api_url: str) -> None:
    try:
        with _api(api_url) as c:
            r = c.get("health")
            r.raise_for_status()
    except Exception as e:
        raise DeployError(
            f"no Prefect server answers at {api_url} ({type(e).__name__}); start one with "
            f"`prefect server start --host 127.0.0.1` and export PREFECT_API_URL=http://127.0.0.1:4200/api"
        ) from None


def ensure_work_pool(api_url: str, pool: str, pool_type: str = "process") -> bool:
    """Create the work pool when missing; True when created."""
    with _api(api_url) as c:
        r = c.get(f"work_pools/{pool}")
        if r.status_code == 200:
            found = r.json().get("type")
            if found != pool_type:
                raise DeployError(f"work pool '{pool}' exists with type '{found}', not '{pool_type}'; pick another --pool")
            return False
        from prefect.workers.process import ProcessWorker

        template = ProcessWorker.get_default_base_job_template()
        r = c.post("work_pools/", json={"name": pool, "type": pool_type, "base_job_template": template,
                                        "description": "DLP pipeline: flow runs as local subprocesses"})
        if r.status_code not in (200, 201, 409):
            raise DeployError(f"cannot create work pool '{pool}': HTTP {r.status_code} {r.text[:200]}")
        return r.status_code != 409


def ensure_global_limit(api_url: str, name: str = GLOBAL_LIMIT, limit: int = 1) -> bool:
    with _api(api_url) as c:
        r = c.get(f"v2/concurrency_limits/{name}")
        if r.status_code == 200:
            return False
        r = c.post("v2/concurrency_limits/", json={"name": name, "limit": limit, "active": True})
        if r.status_code not in (200, 201, 409):
            raise DeployError(f"cannot create global concurrency limit '{name}': HTTP {r.status_code} {r.text[:200]}")
        return r.status_code != 409


def read_deployments(api_url: str, names: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    with _api(api_url) as c:
        r = c.post("deployments/filter", json={"deployments": {"name": {"any_": list(names)}}, "limit": 200})
        r.raise_for_status()
        for d in r.json():
            crons = [s.get("schedule", {}).get("cron") for s in d.get("schedules") or [] if s.get("schedule")]
            flow = c.get(f"flows/{d['flow_id']}").json().get("name")
            out.append({"name": d["name"], "flow": flow, "full_name": f"{flow}/{d['name']}", "id": d["id"],
                        "work_pool": d.get("work_pool_name"), "schedules": [x for x in crons if x],
                        "parameters": d.get("parameters") or {}})
    return sorted(out, key=lambda d: d["full_name"])


def _prefect_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("prefect")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]


def deploy(
    api_url: str | None = None,
    *,
    pool: str = DEFAULT_POOL,
    cron: str | None = None,
    timezone: str | None = None,
    names: Sequence[str] | None = None,
    prefect_file: str | os.PathLike[str] = PREFECT_FILE,
    project_dir: str | os.PathLike[str] = ROOT,
    global_limit: int = 1,
    timeout: float = 600,
) -> dict[str, Any]:
    """Register the deployments; returns ``{"api_url", "pool", "created_pool", "deployments", "skipped"}``."""
    api_url = api_url or os.environ.get("PREFECT_API_URL")
    if not api_url:
        raise DeployError("PREFECT_API_URL is not set: start `prefect server start --host 127.0.0.1`, then "
                          "export PREFECT_API_URL=http://127.0.0.1:4200/api (or pass --api-url)")
    if cron is not None:
        _check_cron(cron)
    check_server(api_url)
    doc, skipped = prepare_prefect_file(pool=pool, cron=cron, timezone=timezone, names=names,
                                        prefect_file=prefect_file, project_dir=project_dir)
    if not doc["deployments"]:
        raise DeployError("nothing to deploy: " + "; ".join(f"{s['name']}: {s['reason']}" for s in skipped))
    created_pool = ensure_work_pool(api_url, pool)
    ensure_global_limit(api_url, GLOBAL_LIMIT, global_limit)
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_CLI_PROMPT": "false"}
    with tempfile.TemporaryDirectory(prefix="dlp-deploy-") as tmp:
        file = Path(tmp) / "prefect.yaml"
        file.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        cmd = [*_prefect_cmd(), "--no-prompt", "deploy", "--all", "--prefect-file", str(file)]
        try:
            proc = subprocess.run(cmd, cwd=str(project_dir), env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeployError(f"`prefect deploy` did not finish within {timeout:.0f}s") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stdout + "\n" + proc.stderr).splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if "rror" in ln), lines[-1] if lines else "no output")
        raise DeployError(f"`prefect deploy` failed (exit {proc.returncode}): {reason}")
    names_done = [d["name"] for d in doc["deployments"]]
    return {"api_url": api_url, "pool": pool, "created_pool": created_pool,
            "deployments": read_deployments(api_url, names_done), "skipped": skipped, "output": proc.stdout}


def _check_cron(cron: str) -> None:
    try:
        from croniter import croniter

        ok = croniter.is_valid(cron)
    except ImportError:  # pragma: no cover - croniter ships with prefect
        ok = len(cron.split()) in (5, 6)
    if not ok:
        raise DeployError(f"--cron '{cron}' is not a valid cron expression (e.g. '0 3 * * *' = daily at 03:00)")


if __name__ == "__main__":  # pragma: no cover
    import json

    try:
        print(json.dumps(deploy(*(sys.argv[1:2])), indent=1, default=str))
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
