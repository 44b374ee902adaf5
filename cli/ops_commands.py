"""Operations commands of the ``dlp`` CLI: ``deploy``, ``watch``, ``promote``, ``models``, ``report``.

``register(app)`` adds them to the Typer app of :mod:`cli`. prefect, mlflow and the flows are imported
inside the commands, so ``dlp --help`` stays fast. Errors print one line ``error: ...`` on stderr and exit
with status 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

TrackingOpt = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite in --workdir)")
WorkdirOpt = typer.Option(".dlp-work", "--workdir", help="pipeline work folder (holds mlflow.db when no tracking URI is set)")
JsonOpt = typer.Option(False, "--json", help="print JSON for scripts")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _quiet_mlflow() -> None:
    import logging

    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    for name in ("mlflow", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _client(tracking_uri: Optional[str], workdir: str):
    """An MLflow client for an existing registry (a missing SQLite file is an error, never created here)."""
    from pipeline import registry as reg

    uri = reg.resolve_tracking_uri(tracking_uri, workdir)
    db = reg.sqlite_path(uri)
    if db is not None and not db.exists():
        _fail(f"no MLflow registry at {db} (nothing compressed yet?); pass --tracking-uri or --workdir")
    _quiet_mlflow()
    return reg.get_client(uri, workdir), uri


# ============================================================================================ deploy
def deploy_cmd(
    api_url: Optional[str] = typer.Option(None, "--api-url", help="Prefect API (default: $PREFECT_API_URL)"),
    pool: str = typer.Option("dlp-process", "--pool", help="process work pool to deploy to (created when missing)"),
    cron: Optional[str] = typer.Option(None, "--cron", help="schedule of watch-releases (default in prefect.yaml: '0 3 * * *')"),
    timezone: Optional[str] = typer.Option(None, "--timezone", help="timezone of the cron schedule (default UTC)"),
    only: Optional[List[str]] = typer.Option(None, "--only", help="deploy only these (compress, sweep, watch-releases); repeatable"),
    as_json: bool = JsonOpt,
):
    """Register the compress, sweep and watch-releases deployments on a running Prefect server."""
    from deployments.deploy import DeployError, deploy

    try:
        result = deploy(api_url, pool=pool, cron=cron, timezone=timezone, names=only or None)
    except DeployError as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps({k: v for k, v in result.items() if k != "output"}, indent=1))
        return
    typer.echo(f"deployed to {result['api_url']} (work pool {result['pool']}{', created' if result['created_pool'] else ''}):")
    for d in result["deployments"]:
        sched = f"  schedule: {', '.join(d['schedules'])}" if d["schedules"] else ""
        typer.echo(f"  {d['full_name']:<34} {d['id']}{sched}")
    for s in result["skipped"]:
        typer.echo(f"  skipped {s['name']}: {s['reason']}", err=True)
    typer.echo(f"run them with a worker: prefect worker start --pool {result['pool']}")


# ============================================================================================ watch
def watch_cmd(
    config: Path = typer.Option(Path("configs/watch.yaml"), "--config", help="watch config (models, release sources, jobs)"),
    only: Optional[List[str]] = typer.Option(None, "--only", help="watch only these entries; repeatable"),
    dry_run: bool = typer.Option(False, "--dry-run", help="report new releases, compress nothing"),
    as_json: bool = JsonOpt,
):
    """Check the watched models once and compress each new release (the watch-releases flow, run here)."""
    from pipeline.jobconfig import JobError

    try:
        from flows.watch import load_watch_config

        cfg, _ = load_watch_config(config)
        if only:
            unknown = sorted(set(only) - {e.name for e in cfg.models})
            if unknown:
                _fail(f"{config}: no watch entry named {', '.join(unknown)} (entries: {', '.join(e.name for e in cfg.models) or 'none'})")
    except JobError as e:
        _fail(str(e))
    _quiet_mlflow()
    from flows.watch import watch_releases

    try:
        outcomes = watch_releases(config=str(config), only=only or None, dry_run=dry_run, fail_on_error=False)
    except (JobError, ValueError) as e:
        _fail(str(e).splitlines()[0])
    if as_json:
        typer.echo(json.dumps(outcomes, indent=1, default=str))
    else:
        for o in outcomes:
            rev = (o.get("revision") or "")[:12]
            ver = f" -> {o['registered_name']} v{o['version']}" if o.get("version") else ""
            extra = f"  ({o['error']})" if o.get("error") else ""
            typer.echo(f"{o['name']:<28} {o['status']:<12} {rev}{ver}{extra}")
    errors = [o for o in outcomes if o["status"] == "error"]
    if errors:
        _fail(f"{len(errors)} of {len(outcomes)} watched model(s) failed: "
              + "; ".join(f"{o['name']}: {o['error']}" for o in errors))


# ============================================================================================ promote
def promote_cmd(
    name: str = typer.Argument(..., help="registered model name, e.g. smollm2-135m-dlp"),
    gate: str = typer.Option(..., "--gate", help="conditions, e.g. 'ppl_ratio<=1.5,zero_shot_drop<=0.05,sparsity>=0.6'"),
    alias: str = typer.Option("champion", "--alias", help="alias to move"),
    reason: Optional[str] = typer.Option(None, "--reason", help="why (recorded on the version; default: the gate result)"),
    by: Optional[str] = typer.Option(None, "--by", help="who (default: $DLP_PROMOTED_BY, $USER)"),
    version: Optional[List[int]] = typer.Option(None, "--version", help="consider only these versions; repeatable"),
    dry_run: bool = typer.Option(False, "--dry-run", help="show the choice, change nothing"),
    tracking_uri: Optional[str] = TrackingOpt,
    workdir: str = WorkdirOpt,
    as_json: bool = JsonOpt,
):
    """Move the champion alias to the best version that passes the gate (metrics relative to dense)."""
    from pipeline.promotion import PromotionError, parse_gate, promote

    try:
        conditions = parse_gate(gate)  # bad gate: fail before touching the registry
    except PromotionError as e:
        _fail(str(e))
    client, _ = _client(tracking_uri, workdir)
    try:
        res = promote(name, conditions, alias=alias, reason=reason, by=by, dry_run=dry_run, versions=version,
                      client=client)
    except PromotionError as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps(res.to_json(), indent=1, default=str))
        return
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in res.metrics.items() if v is not None)
    if res.dry_run:
        typer.echo(f"would move {alias} of {name} to v{res.version} (now: {f'v{res.previous}' if res.previous else 'none'}): {metrics}")
    elif not res.changed:
        typer.echo(f"{name} v{res.version} is already {alias}: {metrics}")
    else:
        prev = f" (was v{res.previous})" if res.previous is not None else ""
        typer.echo(f"{alias} of {name} -> v{res.version}{prev} by {res.by} at {res.at}: {metrics}")


# ============================================================================================ models
def models_cmd(
    name: str = typer.Argument(..., help="registered model name"),
    tracking_uri: Optional[str] = TrackingOpt,
    workdir: str = WorkdirOpt,
    as_json: bool = JsonOpt,
):
    """Table of a registered model's versions: method, allocation, sparsity, perplexity, zero-shot, aliases."""
    from pipeline.variants import PromotionError, format_table, load_variants

    client, _ = _client(tracking_uri, workdir)
    try:
        variants = load_variants(name, client=client)
    except PromotionError as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps([v.to_json() for v in variants], indent=1, default=str))
    elif not variants:
        typer.echo(f"{name} has no versions")
    else:
        typer.echo(format_table(variants))


# ============================================================================================ report
def report_cmd(
    name: str = typer.Argument(..., help="registered model name"),
    out: Optional[Path] = typer.Option(None, "--out", help="HTML file (default: <workdir>/reports/<name>.html)"),
    no_log: bool = typer.Option(False, "--no-log", help="do not log the report to MLflow"),
    tracking_uri: Optional[str] = TrackingOpt,
    workdir: str = WorkdirOpt,
    as_json: bool = JsonOpt,
):
    """Self-contained HTML comparison report (sparsity profiles, perplexity vs sparsity, metrics table)."""
    from pipeline.promotion import PromotionError
    from pipeline.report import build_report

    client, uri = _client(tracking_uri, workdir)
    if out is not None and out.exists() and out.is_dir():
        _fail(f"--out {out} is a folder; give a file name such as {out / (name + '.html')}")
    try:
        res = build_report(name, out, tracking_uri=uri, workdir=workdir, log_to_mlflow=not no_log,
                           prefect_artifact=False, client=client)
    except PromotionError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot write the report: {e.strerror or e} ({e.filename or out})")
    if as_json:
        typer.echo(json.dumps(res, indent=1, default=str))
        return
    typer.echo(f"report of {name} ({res['versions']} versions): {res['path']}")
    if res.get("artifact_uri"):
        typer.echo(f"logged to MLflow run {res['mlflow_run_id']}: {res['artifact_uri']}")


def register(app: typer.Typer) -> None:
    """Add the operations commands to ``app`` (idempotent: names already registered are left alone)."""
    have = {c.name for c in app.registered_commands}
    for name, fn in (("deploy", deploy_cmd), ("watch", watch_cmd), ("promote", promote_cmd), ("models", models_cmd),
                     ("report", report_cmd)):
        if name not in have:
            app.command(name)(fn)
