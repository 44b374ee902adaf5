"""``dlp compress`` and ``dlp sweep``: the pipeline commands, registered on the ``dlp`` Typer app.

    from cli import app
    from cli.pipeline_commands import register
    register(app)

Prefect, MLflow and torch are imported inside the commands (``dlp --help`` stays fast). Order of work:
load + validate the job (JobError: one line, exit 2) -> preflight (S3 endpoint, MLflow URI, workdir;
PreflightError: one line, exit 2, in seconds) -> start Prefect (the temporary local server starts in the
background while the pipeline code is imported) -> run the flow -> print the summary table (or ``--json``).

Environment: ``PREFECT_API_URL`` (a Prefect server; default: a temporary local one), ``MLFLOW_TRACKING_URI``
(default: SQLite in the workdir), ``AWS_*`` / ``AWS_ENDPOINT_URL_S3`` for an ``s3://`` store. Without
``PREFECT_API_URL``/``PREFECT_HOME``/``PREFECT_PROFILE`` the Prefect database lives in ``<workdir>/prefect``,
so everything a run keeps is under one workdir (default ``.dlp-work``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from cli.prefect_server import start_if_needed

__all__ = ["format_summary", "register"]

ConfigOpt = typer.Option(None, "--config", "--job", "-c", help="job YAML (default: the offline demo, configs/demo.yaml)")
SetOpt = typer.Option(None, "--set", help="override a job setting, e.g. --set pruning.alpha=0.2 (repeatable)")
ModelOpt = typer.Option(None, "--model", help="model.source: hub id, local folder, .gguf, or smollm2-135m")
RevisionOpt = typer.Option(None, "--revision", help="model.revision (hub branch, tag or commit)")
WorkdirOpt = typer.Option(None, "--workdir", help="work folder for artifacts, MLflow and Prefect (default .dlp-work)")
StorageOpt = typer.Option(None, "--storage", help="artifact store: a folder, file:///abs/path or s3://bucket/prefix")
JsonOpt = typer.Option(False, "--json", help="print the summary as JSON on stdout")


def _die(message: str, code: int = 2) -> None:
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(code)


def _overrides(sets: Optional[list[str]], **flags: Any) -> dict[str, Any]:
    from pipeline.jobconfig import parse_overrides

    out = parse_overrides(sets or [])
    for key, value in flags.items():
        if value is not None:
            out[key] = value
    return out


def _load(config: Optional[Path], sets: Optional[list[str]], **flags: Any):
    from pipeline.jobconfig import resolve_job

    return resolve_job(None, str(config) if config is not None else None, _overrides(sets, **flags))


def _prefect_env(cfg) -> None:
    """Defaults before prefect is imported: no telemetry; the Prefect database under the workdir unless the
    user points Prefect somewhere (PREFECT_API_URL / PREFECT_HOME / PREFECT_PROFILE)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.data_dir:
        os.environ.setdefault("DLP_DATA_DIR", cfg.data_dir)
    if "prefect" not in sys.modules and not any(os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_PROFILE")):
        home = Path(cfg.workdir) / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(home)


def _preimport() -> None:
    """Import what every run needs while the Prefect server boots in its own process (seconds off a fully
    cached re-run): torch via dlp.models (fetch), MLflow's client and SQL store (register), and Prefect's
    collections (loaded on the first result-storage block)."""
    try:
        import dlp.models  # noqa: F401
        import mlflow  # noqa: F401
        import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
        from prefect.plugins import load_prefect_collections

        load_prefect_collections()
    except Exception:  # noqa: BLE001 -- the stages import them again and report errors there
        pass


def _preflight(cfg) -> None:
    from pipeline.preflight import run_preflight

    run_preflight(cfg)
    _check_data(cfg)
    _check_recovery(cfg)
    _check_quantization(cfg)


def _check_recovery(cfg) -> None:
    """A ``recovery:`` block on a local model: its target modules and training text are checked here, in
    seconds (the flow checks a hub model right after fetching it, before calibration)."""
    from dlp.models import BUNDLED, resolve_model
    from pipeline.stages.recover import check_recovery, recovery_params

    source = cfg.model.source
    if cfg.recovery is None or not (source in BUNDLED or Path(source).expanduser().is_dir()):
        return
    check_recovery(recovery_params(cfg), resolve_model(source).path)


def _check_quantization(cfg) -> None:
    """A local model folder's config against the ``quantization:`` settings (group size vs in_features) before
    Prefect starts; other sources are checked by the flow right after fetch, still before any weight is loaded."""
    folder = Path(cfg.model.source).expanduser()
    if cfg.quantization is not None and (folder / "config.json").is_file():
        from pipeline.stages.quantize import check_quantization

        check_quantization(cfg, folder)


def _check_data(cfg) -> None:
    """Read the calibration and perplexity texts once before anything starts (local files: well under a
    second) so a missing offline mirror fails in seconds, not after the Prefect server and model load.
    Hub sources without a data folder are not fetched here (DLPError at once when the hub is offline)."""
    from dlp import data, settings
    from dlp.errors import DLPError

    sources = [("calibration.source", cfg.calibration.source)]
    if cfg.evaluation.perplexity is not None:
        sources.append(("evaluation.perplexity.data", cfg.evaluation.perplexity.data))
    offline = any(os.environ.get(k) == "1" for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    root = cfg.data_dir or settings.data_dir()
    for setting, src in sources:
        hub = src in data.STANDARD_SOURCES or src.startswith("hf:")
        if hub and root is None:
            if offline:
                raise DLPError(f"{setting} '{src}' needs the hub but HF offline mode is set: set DLP_DATA_DIR "
                               "(or data_dir in the job file) to the offline data folder")
            continue
        data.load_text(src, cfg.data_dir)


def _known_errors():
    from dlp.errors import DLPError
    from pipeline.jobconfig import JobError
    from pipeline.preflight import PreflightError

    return (DLPError, JobError, PreflightError)


def _fmt(v: Any, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def format_summary(s: dict[str, Any]) -> str:
    """The human summary printed after ``dlp compress``."""
    lines = [f"DLP compress: {s['base_model']['source']} -> {s.get('variant', '')}", ""]
    lines.append(f"{'stage':<12} {'cached':<7} {'seconds':>8}")
    for name, st in s["stages"].items():
        secs = st.get("seconds")
        lines.append(f"{name:<12} {'yes' if st.get('cached') else 'no':<7} {('-' if secs is None else f'{secs:.1f}'):>8}")
    lines.append("")
    dense, pruned = s.get("dense_ppl"), s.get("pruned_ppl")
    lines.append(f"{'':<20} {'dense':>10} {'pruned':>10}")
    lines.append(f"{'perplexity':<20} {_fmt(dense):>10} {_fmt(pruned):>10}")
    lines.append(f"{'sparsity':<20} {'0':>10} {_fmt(s['achieved_sparsity'], 4):>10}   (target {s['target_sparsity']:g})")
    q = s.get("quantization")
    if q:
        lines.append(f"quantized: W{q['bits']}A16, group {q['group_size']}, {q['method']} -- "
                     f"{q['bytes_on_disk'] / 2**20:.1f} MiB on disk vs {q['parent_bytes'] / 2**20:.1f} MiB pruned; "
                     f"{q['zeros_loaded']} zeros after loading back (pruned: {q['zeros_parent']}); perplexity above is "
                     "the quantized model's")
    found = s.get("alpha_search")
    if found:
        uni = found.get("uniform_proxy")
        lines.append(f"alpha auto: {found['alpha']:.4f} ({found['statistic']}); held-out proxy {_fmt(found.get('proxy'))}"
                     f" vs uniform {_fmt(uni)}; {found['evaluations']} candidates evaluated, "
                     f"{found['cached_candidates']} cached, {found['cost']['seconds']:.0f}s")
        lines.append(f"            curve: {found['curve_uri']}")
    zs = s.get("zero_shot")
    if zs:
        for name, t in zs["tasks"].items():
            lines.append(f"{'acc ' + name:<20} {_fmt(t.get('acc_dense'), 4):>10} {_fmt(t.get('acc'), 4):>10}")
        lines.append(f"{'mean acc':<20} {_fmt(zs.get('mean_acc_dense'), 4):>10} {_fmt(zs.get('mean_acc'), 4):>10}")
    rec = s.get("recovery")
    if rec:
        lines.append(f"{'recovery (LoRA)':<20} ppl {_fmt(rec['ppl_before'])} -> {_fmt(rec['ppl_after'])}, sparsity "
                     f"{rec['sparsity_before']:.6f} -> {rec['sparsity_after']:.6f} ({'exact' if rec['exact'] else 'changed'}), "
                     f"loss {_fmt(rec['loss_first'])} -> {_fmt(rec['loss_last'])} over {rec['steps']} steps")
    lines.append("")
    lines.append(f"registered: {s['registered_name']} version {s['version']} ({s['model_uri']})")
    lines.append(f"load it:    mlflow.pyfunc.load_model(\"{s['alias_uri']}\")  (stored as masks: "
                 ".unwrap_python_model().model is the transformers model)")
    lines.append(f"checkpoint: {s['checkpoint_uri']}")
    return "\n".join(lines)


def _run_guarded(fn):
    """Run fn(); known errors -> one line + exit 2; other failures -> one line + exit 1."""
    try:
        return fn()
    except typer.Exit:
        raise
    except _known_errors() as e:
        _die(str(e), 2)
    except KeyboardInterrupt:
        _die("interrupted; run the same command again to resume", 130)
    except Exception as e:  # noqa: BLE001 -- a stage failed: say which, the rerun resumes
        _die(f"{type(e).__name__}: {e} (finished stages are kept: run the same command again to resume)", 1)


def _alpha(text: Optional[str]):
    """``--alpha``: None, "auto" or a float (range checked by the job schema)."""
    if text is None or text.strip().lower() == "auto":
        return None if text is None else "auto"
    try:
        return float(text)
    except ValueError:
        from dlp.errors import DLPError

        raise DLPError(f"--alpha must be a number such as 0.15, or auto, got {text!r}") from None


def _split(text: Optional[str], conv=str) -> Optional[list]:
    if text is None:
        return None
    from dlp.errors import DLPError

    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise DLPError(f"empty list {text!r}: give comma-separated values")
    try:
        return [conv(t) for t in items]
    except DLPError as e:
        raise DLPError(f"cannot read {text!r}: {e}") from None
    except ValueError:
        raise DLPError(f"cannot read {text!r} as a comma-separated list of numbers") from None


def _start(cfg):
    """Prefect defaults, then the temporary server (it boots on the other core while the checks run)."""
    _prefect_env(cfg)
    return start_if_needed()


def _ready(server) -> None:
    if server is not None:
        _preimport()
        server.wait()


def compress_command(
    config: Optional[Path] = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    model: Optional[str] = ModelOpt,
    revision: Optional[str] = RevisionOpt,
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="pruning.sparsity (target mean sparsity)"),
    alpha: Optional[str] = typer.Option(None, "--alpha", help="pruning.alpha (DLP): a number such as 0.15, or auto"),
    statistic: Optional[str] = typer.Option(None, "--statistic", help="pruning.statistic (DLP): median | mean | auto"),
    method: Optional[str] = typer.Option(None, "--method", help="pruning.method: wanda | sparsegpt | magnitude"),
    allocation: Optional[str] = typer.Option(None, "--allocation", help="pruning.allocation: dlp | owl | uniform"),
    workdir: Optional[str] = WorkdirOpt,
    storage: Optional[str] = StorageOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Run the compression pipeline (statistics -> rates -> prune -> evaluate -> register); resumable.

    With no arguments: the offline demo (SmolLM2-135M, Wanda at 70% with DLP rates)."""

    def go():
        cfg = _load(config, sets, **{"model.source": model, "model.revision": revision, "pruning.sparsity": sparsity,
                                     "pruning.alpha": _alpha(alpha), "pruning.statistic": statistic,
                                     "pruning.method": method, "pruning.allocation": allocation,
                                     "workdir": workdir, "storage.uri": storage})
        server = _start(cfg)
        _preflight(cfg)
        from flows.compress import compress as compress_flow

        _ready(server)
        summary = compress_flow(job=cfg.model_dump(mode="json"))
        typer.echo(json.dumps(summary, default=str) if as_json else format_summary(summary))

    _run_guarded(go)


def _print_sweep(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result, default=str))
    else:
        typer.echo(result["table"])
        typer.echo(f"\ndense perplexity: {_fmt(result['dense_ppl'])}; sweep logged to MLflow run {result['sweep_run_id']}")
        for s in result["variants"]:
            typer.echo(f"  {s['variant']}: {s['alias_uri'].split('@')[0]}/{s['version']}")
    if result["failed"]:
        typer.echo(f"error: {len(result['failed'])} variant(s) failed: "
                   + "; ".join(f"{f['variant']}: {f['error']}" for f in result["failed"]), err=True)
        raise typer.Exit(1)


def sweep_command(
    config: Optional[Path] = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    methods: Optional[str] = typer.Option(None, "--methods", help="comma list, e.g. wanda,sparsegpt"),
    allocations: Optional[str] = typer.Option(None, "--allocations", help="comma list, e.g. uniform,owl,dlp"),
    sparsities: Optional[str] = typer.Option(None, "--sparsities", help="comma list, e.g. 0.6,0.7"),
    alphas: Optional[str] = typer.Option(None, "--alphas", help="comma list of DLP alphas, e.g. 0,0.15,auto"),
    model: Optional[str] = ModelOpt,
    workdir: Optional[str] = WorkdirOpt,
    storage: Optional[str] = StorageOpt,
    workers: int = typer.Option(2, "--workers", help="variants run concurrently (thread pool / dask threads)"),
    dask: bool = typer.Option(False, "--dask", help="fan out through prefect_dask.DaskTaskRunner (local cluster)"),
    as_json: bool = JsonOpt,
) -> None:
    """Statistics once, then every method x allocation x sparsity (x alpha) variant; comparison table + plot."""

    def go():
        cfg = _load(config, sets, **{"model.source": model, "workdir": workdir, "storage.uri": storage})
        axes = dict(methods=_split(methods), allocations=_split(allocations), sparsities=_split(sparsities, float),
                    alphas=_split(alphas, _alpha))
        if workers < 1:
            _die("--workers must be at least 1")
        server = _start(cfg)  # before anything imports prefect
        from pipeline.stage_inputs import expand_variants

        expand_variants(cfg, **axes)  # validate every variant before anything runs
        _preflight(cfg)
        from prefect.task_runners import ThreadPoolTaskRunner

        from flows.sweep import dask_runner, sweep as sweep_flow

        runner = dask_runner(workers=1, threads=workers) if dask else ThreadPoolTaskRunner(max_workers=workers)
        _ready(server)
        _print_sweep(sweep_flow.with_options(task_runner=runner)(job=cfg.model_dump(mode="json"), **axes), as_json)

    _run_guarded(go)


def register(app: typer.Typer) -> None:
    """Add ``compress`` and ``sweep`` to the app (idempotent)."""
    existing = {c.name or (c.callback.__name__ if c.callback else None) for c in app.registered_commands}
    if "compress" not in existing:
        app.command("compress")(compress_command)
    if "sweep" not in existing:
        app.command("sweep")(sweep_command)
