"""The library commands of ``dlp``: ratios, prune, ppl, eval -- direct calls into dlp/, no pipeline."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import typer

from dlp import bounds as B
from dlp.errors import DLPError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Dynamic Layerwise Pruning (DLP) for LLMs: statistics, allocation, pruning, evaluation.")

# ---- shared options (defaults follow the paper: C4 128 x 2048, seed 0, alpha 0.15, median)
ModelOpt = typer.Option("smollm2-135m", "--model", help="hub id, local HF folder, .gguf file, or 'smollm2-135m' (bundled)")
RevisionOpt = typer.Option(None, "--revision", help="hub revision (branch, tag or commit)")
DtypeOpt = typer.Option("auto", "--dtype", help="auto (the checkpoint's own) | float32 | bfloat16 | float16")
BudgetOpt = typer.Option(None, "--memory-budget", help="memory for calibration states before they spill to disk, e.g. 8GB (default: half the available memory)")
SpillOpt = typer.Option(None, "--spill-dir", help="folder for spilled calibration states (default: the system temp folder)")
DeviceOpt = typer.Option("cpu", "--device", help="cpu (default) or cuda")
TrustOpt = typer.Option(False, "--trust-remote-code", help="allow models that need custom code")
CalibOpt = typer.Option("c4", "--calibration", help="c4 | wikitext2-valid | hf:PATH[:CONFIG[:SPLIT]] | a file or folder")
NsamplesOpt = typer.Option(128, "--nsamples", help="calibration windows")
SeqlenOpt = typer.Option(2048, "--seqlen", help="tokens per calibration window")
SeedOpt = typer.Option(0, "--seed", help="Python random seed for window sampling")
DataDirOpt = typer.Option(None, "--data-dir", help="offline dataset mirror (default: env DLP_DATA_DIR)")
SparsityOpt = typer.Option(0.7, "--sparsity", help="target mean sparsity p in (0, 1)")
AllocOpt = typer.Option("dlp", "--allocation", help="dlp | owl | uniform")
AlphaOpt = typer.Option("0.15", "--alpha", help="DLP alpha: max R - min R = 2 alpha")
StatOpt = typer.Option("median", "--statistic", help="median (paper) | mean (released code)")
OwlMOpt = typer.Option(5.0, "--owl-m", help="OWL outlier threshold M (x block mean)")
OwlLOpt = typer.Option(0.08, "--owl-lambda", help="OWL lambda: max R - min R = 2 lambda")
JsonOpt = typer.Option(False, "--json", help="print JSON for scripts")
BatchOpt = typer.Option(None, "--batch-size", help="calibration samples per block forward (default: ~8k tokens)")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _set_data_dir(data_dir: Optional[Path]) -> None:
    if data_dir is not None:
        if not data_dir.is_dir():
            _fail(f"--data-dir {data_dir} is not a folder")
        os.environ["DLP_DATA_DIR"] = str(data_dir.resolve())


def _alpha(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise DLPError(f"--alpha must be a number such as 0.15, or auto, got '{text}'") from None


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        typer.echo(msg, err=True)


def _progress(quiet: bool) -> None:
    """Show the engine's per-block progress on stderr (not with --json)."""
    import logging

    logger = logging.getLogger("dlp.engine")
    if quiet or any(getattr(h, "_dlp_cli", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._dlp_cli = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _prepare(model, revision, dtype, trust, calibration, nsamples, seqlen, seed, quiet):
    """Check the settings and the calibration text, open the model for streaming (its checkpoint validated,
    nothing loaded), draw the windows. Returns (streamed model, tokenizer, ref, windows)."""
    from transformers import AutoTokenizer

    from dlp import data, models
    from dlp.streaming import open_streamed

    if nsamples <= 0:
        raise DLPError(f"--nsamples must be a positive integer, got {nsamples}")
    if seqlen <= 1:
        raise DLPError(f"--seqlen must be an integer above 1, got {seqlen}")
    text = data.load_text(calibration)  # bad data fails before the model is opened
    _progress(quiet)
    t = time.perf_counter()
    ref = models.resolve_model(model, revision)
    sm = open_streamed(ref, dtype=dtype, trust_remote_code=trust)
    tok = AutoTokenizer.from_pretrained(ref.path, trust_remote_code=trust)
    _log(f"opened {ref.source} for streaming, {sm.dtype} ({time.perf_counter() - t:.1f}s)", quiet)
    windows = data.calibration_windows(tok, text, nsamples, seqlen, seed)
    return sm, tok, ref, windows


def _budget(text: Optional[str]) -> Optional[int]:
    return None if text is None else _budget_of(text, "--memory-budget")


def _budget_of(text: str, what: str) -> int:
    from dlp.resources import parse_size

    return parse_size(text, what)


def _in_memory(ref, dtype, trust):
    """A loader of the whole model, for the steps that still need it (the alpha search)."""
    from dlp.models import load_model

    return lambda: load_model(ref, dtype=dtype, trust_remote_code=trust)[0]


def _allocation(net, stats, allocation, sparsity, alpha, statistic, owl_m, owl_lambda, auto=None):
    """``net``: the model (streamed or in memory) for OWL's M. ``auto`` (for --alpha auto / --statistic auto):
    load (the in-memory model the search prunes and restores), tok, calibration, nsamples, seqlen, seed, windows,
    heldout (count or None), method, pattern, mode, device, batch_size and report (folder for the curve
    JSON + PNG); the search summary lands in the allocation's params under ``alpha_search``."""
    from dlp import allocation as alloc
    from dlp.recipe import is_auto, statistics_with_owl_m

    if allocation == "owl":
        stats = statistics_with_owl_m(stats, net, owl_m)
    if is_auto(allocation, alpha, statistic):
        from dlp import data
        from dlp.autoalpha import choose_alpha_from_text

        if auto is None:
            raise DLPError("--alpha auto / --statistic auto are available in `dlp ratios` and `dlp prune`")
        a = auto
        search = choose_alpha_from_text(a["load"](), a["tok"], stats, a["windows"], data.load_text(a["calibration"]),
                                        nsamples=a["nsamples"], seqlen=a["seqlen"], seed=a["seed"], heldout=a["heldout"],
                                        method=a["method"], pattern=a["pattern"], mode=a["mode"], sparsity=sparsity,
                                        statistic=statistic, device=a["device"], batch_size=a["batch_size"],
                                        alpha=None if alpha == "auto" else alpha)
        json_path, png_path = search.save(a["report"])
        result = search.allocation()
        result.params["alpha_search"] = {"alpha": search.alpha, "statistic": search.statistic, "proxy": search.proxy,
                                         "uniform_proxy": search.uniform_proxy, "cost": search.cost,
                                         "curve_json": str(json_path), "curve_png": str(png_path)}
        return result
    return alloc.allocate(stats, allocation, sparsity, alpha=alpha, statistic=statistic, owl_lambda=owl_lambda)


@app.command()
def ratios(model: str = ModelOpt, revision: Optional[str] = RevisionOpt, dtype: str = DtypeOpt,
           device: str = DeviceOpt, trust_remote_code: bool = TrustOpt, calibration: str = CalibOpt,
           nsamples: int = NsamplesOpt, seqlen: int = SeqlenOpt, seed: int = SeedOpt,
           data_dir: Optional[Path] = DataDirOpt, sparsity: float = SparsityOpt, allocation: str = AllocOpt,
           alpha: str = AlphaOpt, statistic: str = StatOpt, owl_m: float = OwlMOpt, owl_lambda: float = OwlLOpt,
           batch_size: Optional[int] = BatchOpt, memory_budget: Optional[str] = BudgetOpt, spill_dir: Optional[Path] = SpillOpt,
           stats_out: Optional[Path] = typer.Option(None, "--stats-out", help="also save the statistics artifact (safetensors)"),
           method: str = typer.Option("wanda", "--method", help="--alpha auto: the pruner the alpha is chosen for"),
           pattern: str = typer.Option("unstructured", "--pattern", help="--alpha auto: unstructured | 2:4 | 4:8 | N:M"),
           mode: str = typer.Option("sequential", "--mode", help="--alpha auto: the final run's mode"),
           heldout: Optional[int] = typer.Option(None, "--heldout", help="--alpha auto: held-out calibration windows for the proxy (default ~4096 tokens)"),
           alpha_report: Path = typer.Option(Path("dlp-alpha-search"), "--alpha-report", help="--alpha auto: folder for the proxy curve (JSON + PNG)"),
           as_json: bool = JsonOpt):
    """Per-block sparsities (uniform, OWL or DLP) from one calibration sweep; --alpha auto chooses alpha."""
    from dlp import allocation as alloc
    from dlp.models import resolve_device
    from dlp.statistics import collect_statistics

    _set_data_dir(data_dir)
    a = _alpha(alpha)
    alloc.check_params(allocation, sparsity, 0.15 if a == "auto" else a, "median" if statistic == "auto" else statistic, owl_lambda)
    device = resolve_device(device)
    budget = _budget(memory_budget)
    net, tok, ref, windows = _prepare(model, revision, dtype, trust_remote_code, calibration, nsamples, seqlen, seed, as_json)
    t = time.perf_counter()
    stats = collect_statistics(net, windows, device=device, batch_size=batch_size, owl_m=owl_m,
                               memory_budget=budget, spill_dir=spill_dir)
    _log(f"statistics: {len(stats.blocks)} blocks in {time.perf_counter() - t:.1f}s", as_json)
    if stats_out:
        stats.save(stats_out)
    auto = {"load": _in_memory(ref, dtype, trust_remote_code), "tok": tok, "calibration": calibration, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
            "windows": windows, "heldout": heldout, "method": method, "pattern": pattern, "mode": mode,
            "device": device, "batch_size": batch_size, "report": alpha_report}
    result = _allocation(net, stats, allocation, sparsity, a, statistic, owl_m, owl_lambda, auto=auto)
    out = {**result.to_json(), "model": ref.source, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
           "calibration": calibration, "block_passes": stats.meta["block_passes"],
           "block_statistics": stats.blocks}
    if as_json:
        typer.echo(json.dumps(out))
    else:
        typer.echo(f"{'block':>5} {'sparsity':>9} {'mean':>10} {'median':>10} {'owl%':>7}")
        for i, (r, b) in enumerate(zip(result.ratios, stats.blocks)):
            typer.echo(f"{i:>5} {r:>9.4f} {b['mean']:>10.5f} {b['median']:>10.5f} {b['owl_outlier_ratio']:>7.3f}")
        typer.echo(f"mean {sum(result.ratios) / len(result.ratios):.4f}  range {max(result.ratios) - min(result.ratios):.4f}")
        _echo_alpha_search(result.params)


def _echo_alpha_search(params: dict) -> None:
    """One line about the automatic alpha choice, when the allocation made one."""
    info = params.get("alpha_search")
    if info:
        uniform = "-" if info["uniform_proxy"] is None else round(info["uniform_proxy"], 2)
        typer.echo(f"auto: alpha {info['alpha']:.4f} ({info['statistic']}), proxy {info['proxy']:.2f} vs uniform "
                   f"{uniform}, {info['cost']['evaluations']} proxy evaluations in {info['cost']['seconds']:.1f}s; "
                   f"curve: {info['curve_json']}, {info['curve_png']}")


@app.command()
def prune(model: str = ModelOpt, revision: Optional[str] = RevisionOpt, dtype: str = DtypeOpt,
          device: str = DeviceOpt, trust_remote_code: bool = TrustOpt, calibration: str = CalibOpt,
          nsamples: int = NsamplesOpt, seqlen: int = SeqlenOpt, seed: int = SeedOpt,
          data_dir: Optional[Path] = DataDirOpt, sparsity: Optional[float] = typer.Option(None, "--sparsity", help="target mean sparsity (default 0.7; N/M for an N:M pattern)"),
          allocation: str = AllocOpt, alpha: str = AlphaOpt, statistic: str = StatOpt, owl_m: float = OwlMOpt,
          owl_lambda: float = OwlLOpt, method: str = typer.Option("wanda", "--method", help="magnitude | wanda | sparsegpt"),
          pattern: str = typer.Option("unstructured", "--pattern", help="unstructured | 2:4 | 4:8 | N:M"),
          mode: str = typer.Option("sequential", "--mode", help="sequential | oneshot"),
          batch_size: Optional[int] = BatchOpt, memory_budget: Optional[str] = BudgetOpt,
          spill_dir: Optional[Path] = SpillOpt,
          max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="shard size of the output checkpoint"),
          out: Path = typer.Option(..., "--out", help="folder for the pruned checkpoint"),
          heldout: Optional[int] = typer.Option(None, "--heldout", help="--alpha auto: held-out calibration windows for the proxy (default ~4096 tokens)"),
          alpha_report: Optional[Path] = typer.Option(None, "--alpha-report", help="--alpha auto: folder for the proxy curve (JSON + PNG); default <out>-alpha-search"),
          as_json: bool = JsonOpt):
    """Prune block by block, streaming weights from the checkpoint, into a sharded HF checkpoint plus a sparsity
    report. A killed run started again with the same settings resumes at its first unfinished block."""
    from dlp import allocation as alloc
    from dlp.models import resolve_device
    from dlp.pruning import METHODS, MODES, parse_pattern

    _set_data_dir(data_dir)
    pat = parse_pattern(pattern)
    if method not in METHODS:
        raise DLPError(f"unknown method '{method}'; use one of: {', '.join(METHODS)}")
    if mode not in MODES:
        raise DLPError(f"unknown mode '{mode}'; use one of: {', '.join(MODES)}")
    p = sparsity if sparsity is not None else (pat.n / pat.m if pat.structured else 0.7)
    a = _alpha(alpha)
    alloc.check_params(allocation, p, 0.15 if a == "auto" else a, "median" if statistic == "auto" else statistic, owl_lambda)
    device = resolve_device(device)
    budget = _budget(memory_budget)
    if out.exists() and any(out.iterdir()):
        raise DLPError(f"--out {out} exists and is not empty; choose a new folder")
    net, tok, ref, windows = _prepare(model, revision, dtype, trust_remote_code, calibration, nsamples, seqlen, seed, as_json)
    _check_disk(net, out, windows, spill_dir)
    settings = {"method": method, "mode": mode, "pattern": str(pat), "device": device, "batch_size": batch_size,
                "calibration": calibration, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    auto = {**settings, "load": _in_memory(ref, dtype, trust_remote_code), "tok": tok, "windows": windows,
            "heldout": heldout, "pattern": pat, "report": alpha_report or out.with_name(out.name + "-alpha-search")}
    from cli.streamed_prune import run_streamed_prune

    summary = run_streamed_prune(net, ref, windows, out, settings, allocation=allocation, sparsity=p, alpha=a,
                                 statistic=statistic, owl_m=owl_m, owl_lambda=owl_lambda, auto=auto, budget=budget,
                                 spill_dir=spill_dir, max_shard_size=max_shard_size, allocate=_allocation, quiet=as_json)
    if as_json:
        typer.echo(json.dumps({k: v for k, v in summary.items() if k != "per_linear"}))
    else:
        typer.echo(f"pruned {ref.source} with {method} ({mode}, {pat}) at {allocation}: achieved sparsity "
                   f"{summary['achieved_sparsity']:.4f}; checkpoint in {out}")
        _echo_alpha_search(summary["allocation"])


def _check_disk(net, out: Path, windows, spill_dir) -> None:
    """Free disk for the output checkpoint and the resumable run's calibration states, before any work."""
    from dlp.resources import check_free_disk

    hidden = net.config.hidden_size * windows.numel() * torch_itemsize(net.dtype) * 2
    check_free_disk(out.parent if out.parent.exists() else Path("."), net.reader.nbytes + hidden, "the pruned checkpoint "
                    "and the calibration states")


def torch_itemsize(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


@app.command()
def ppl(model: str = ModelOpt, revision: Optional[str] = RevisionOpt, dtype: str = DtypeOpt,
        device: str = DeviceOpt, trust_remote_code: bool = TrustOpt,
        data: str = typer.Option("wikitext2", "--data", help="wikitext2 (test split) | a file"),
        data_dir: Optional[Path] = DataDirOpt, seqlen: int = SeqlenOpt,
        max_windows: Optional[int] = typer.Option(None, "--max-windows", help="only the first N windows"),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="windows per forward"),
        memory_budget: Optional[str] = BudgetOpt, spill_dir: Optional[Path] = SpillOpt,
        as_json: bool = JsonOpt):
    """WikiText-2 perplexity with the papers' protocol, streaming the model block by block."""
    from transformers import AutoTokenizer

    from dlp import data as dlpdata
    from dlp.models import resolve_device, resolve_model
    from dlp.perplexity import perplexity
    from dlp.streaming import open_streamed

    _set_data_dir(data_dir)
    if seqlen <= 1:
        raise DLPError(f"--seqlen must be an integer above 1, got {seqlen}")
    if max_windows is not None and max_windows <= 0:
        raise DLPError(f"--max-windows must be a positive integer, got {max_windows}")
    device = resolve_device(device)
    budget = _budget(memory_budget)
    text = dlpdata.load_text(data)
    _progress(as_json)
    ref = resolve_model(model, revision)
    with open_streamed(ref, dtype=dtype, trust_remote_code=trust_remote_code) as net:
        tok = AutoTokenizer.from_pretrained(ref.path, trust_remote_code=trust_remote_code)
        ids = dlpdata.evaluation_tokens(tok, text)
        result = {**perplexity(net, ids, seqlen, max_windows=max_windows, device=device, batch_size=batch_size,
                               memory_budget=budget, spill_dir=spill_dir), "model": ref.source, "data": data}
    typer.echo(json.dumps(result) if as_json else f"perplexity {result['ppl']:.4f} over {result['windows']} x {seqlen} tokens")


@app.command("eval")
def eval_(model: str = ModelOpt, revision: Optional[str] = RevisionOpt, dtype: str = DtypeOpt,
          device: str = DeviceOpt, trust_remote_code: bool = TrustOpt, data_dir: Optional[Path] = DataDirOpt,
          tasks: str = typer.Option("zero-shot-7", "--tasks", help="zero-shot-7 | all | comma-separated task names"),
          limit: Optional[int] = typer.Option(None, "--limit", help="only the first N documents of each task"),
          batch_size: int = typer.Option(8, "--batch-size", help="lm-eval batch size"),
          tasks_source: str = typer.Option("local", "--tasks-source", help="local (offline files) | hub (stock tasks)"),
          max_memory: Optional[str] = typer.Option(None, "--max-memory", help="load at most this much (e.g. 20GB); the rest is offloaded to --offload-dir (accelerate big-model inference)"),
          offload_dir: Optional[Path] = typer.Option(None, "--offload-dir", help="folder for offloaded weights when the model exceeds --max-memory"),
          as_json: bool = JsonOpt):
    """Zero-shot accuracy through lm-eval (offline task definitions by default); a model larger than
    --max-memory runs through accelerate's big-model inference with the rest offloaded to disk."""
    from dlp.models import load_model, resolve_device
    from dlp.zeroshot import evaluate_zero_shot, resolve_tasks

    _set_data_dir(data_dir)
    if limit is not None and limit <= 0:
        raise DLPError(f"--limit must be a positive integer, got {limit}")
    names = resolve_tasks(tasks, tasks_source)  # unknown names fail before the model loads
    device = resolve_device(device)
    limit_bytes = None if max_memory is None else _budget_of(max_memory, "--max-memory")
    net, tok, ref = load_model(model, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code,
                               max_memory=limit_bytes, offload_dir=offload_dir)
    result = evaluate_zero_shot(net, tok, names, limit=limit, batch_size=batch_size, tasks_source=tasks_source,
                                device=device)
    result["model"] = ref.source
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"{'task':<16} {'acc':>7} {'acc_norm':>9} {'n':>6}")
    for name, r in result["tasks"].items():
        norm = f"{r['acc_norm']:.4f}" if r.get("acc_norm") is not None else "-"
        typer.echo(f"{name:<16} {r.get('acc', float('nan')):>7.4f} {norm:>9} {r.get('n_samples', 0):>6}")
    typer.echo(f"mean acc {result['mean_acc']:.4f}  (lm-eval {result['harness_version']}, limit {limit})")


@app.command()
def recover(model: str = typer.Option(..., "--model", help="the pruned checkpoint (a folder written by dlp prune, or any model source)"),
            out: Path = typer.Option(..., "--out", help="folder for the recovered checkpoint"),
            steps: int = typer.Option(B.DEFAULT_RECOVERY_STEPS, "--steps", help="optimizer steps"),
            lr: float = typer.Option(B.DEFAULT_RECOVERY_LR, "--lr", help="AdamW learning rate (linear decay to 0)"),
            rank: int = typer.Option(B.DEFAULT_LORA_RANK, "--rank", help="LoRA rank r"),
            alpha: float = typer.Option(B.DEFAULT_LORA_ALPHA, "--alpha", help="LoRA alpha (update scaled by alpha / r)"),
            dropout: float = typer.Option(B.DEFAULT_LORA_DROPOUT, "--dropout", help="LoRA dropout"),
            target_modules: str = typer.Option(",".join(B.DEFAULT_RECOVERY_TARGETS), "--target-modules", help="comma-separated block linears, e.g. q_proj,v_proj"),
            seqlen: int = typer.Option(B.DEFAULT_RECOVERY_SEQLEN, "--seqlen", help="tokens per training window"),
            batch: int = typer.Option(B.DEFAULT_RECOVERY_BATCH, "--batch", help="windows per step"),
            data: Optional[str] = typer.Option(None, "--data", help="training text (default: the checkpoint's calibration source, else c4); windows disjoint from the calibration's"),
            seed: int = typer.Option(B.DEFAULT_RECOVERY_SEED, "--seed", help="seed of the windows, the adapter init and dropout"),
            save_every: int = typer.Option(B.DEFAULT_SAVE_EVERY, "--save-every", help="steps between saved training states"),
            state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="training states for resuming (default <out>.recovery-state)"),
            merge: str = typer.Option(B.DEFAULT_MERGE, "--merge", help="masked (keeps every zero) | none (adapter/ beside the model) | plain (densifies)"),
            device: str = DeviceOpt, trust_remote_code: bool = TrustOpt, data_dir: Optional[Path] = DataDirOpt,
            as_json: bool = JsonOpt):
    """LoRA recovery fine-tuning of a pruned checkpoint; the masked merge keeps its sparsity exactly."""
    from dlp.models import resolve_device
    from dlp.recovery import plan_recovery, run_recovery
    from dlp.recovery_settings import RecoverySettings
    from dlp.recovery_state import FolderSaver

    _set_data_dir(data_dir)
    settings = RecoverySettings(steps=steps, lr=lr, rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules,
                                seqlen=seqlen, batch=batch, data=data, seed=seed, save_every=save_every, merge=merge).validate()
    device = resolve_device(device)
    if out.exists() and any(out.iterdir()):
        raise DLPError(f"--out {out} exists and is not empty; choose a new folder")
    plan = plan_recovery(model, settings, trust_remote_code=trust_remote_code)  # model, targets, text: before training
    states = state_dir or out.with_name(out.name + ".recovery-state")
    saver = FolderSaver(states / plan.key[:16])
    report = run_recovery(plan, out, saver=saver, device=device, log=lambda m: _log(m, as_json))
    shutil.rmtree(saver.root, ignore_errors=True)
    if states.is_dir() and not any(states.iterdir()):
        states.rmdir()
    if as_json:
        typer.echo(json.dumps({**report, "out": str(out)}))
        return
    s, loss = report["sparsity"], report["loss"]
    resumed = f", resumed from step {report['resumed_from_step']}" if report["resumed_from_step"] else ""
    typer.echo(f"recovered {report['model']}: loss {loss[0]:.3f} -> {loss[-1]:.3f} over {report['steps']} steps{resumed}; "
               f"sparsity {s['before']:.4f} -> {s['after']:.4f} ({'exact' if s['exact'] else 'changed'}, merge {merge}); "
               f"{report['seconds']['total']:.0f}s; checkpoint in {out}")
