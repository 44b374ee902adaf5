"""``dlp prune`` end to end on a streamed model: statistics (when the allocation or pruner reads them), the
allocation, then block-by-block pruning into the output checkpoint. Both sweeps are journaled beside ``--out``
under a key of everything they depend on, so the same command run again after a kill resumes where it stopped."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def run_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def run_streamed_prune(net, ref, windows, out: Path, settings: dict, *, allocation: str, sparsity: float, alpha,
                       statistic, owl_m: float, owl_lambda: float, auto: dict, budget, spill_dir, max_shard_size: str,
                       allocate, quiet: bool) -> dict:
    """Returns the summary written as ``dlp_report.json`` (see the module docstring)."""
    from dlp import allocation as alloc
    from dlp.data import fingerprint_tokens
    from dlp.pruning import prune_checkpoint, state_folder
    from dlp.recipe import needs
    from dlp.resume import BlockJournal
    from dlp.statistics import collect_statistics

    method, mode = settings["method"], settings["mode"]
    engine = {"device": settings["device"], "batch_size": settings["batch_size"], "memory_budget": budget,
              "spill_dir": spill_dir}
    base = [ref.fingerprint, str(net.dtype), fingerprint_tokens(windows)]
    stats = None
    if needs(method, mode, allocation).statistics:
        journal = BlockJournal(state_folder(out) / "statistics", run_key("statistics", *base, owl_m))
        stats = collect_statistics(net, windows, owl_m=owl_m, journal=journal, **engine)
        result = allocate(net, stats, allocation, sparsity, alpha, statistic, owl_m, owl_lambda, auto=auto)
    else:
        result = alloc.uniform(net.layout.num_blocks, sparsity)
    summary = {"allocation": result.to_json(), "model": ref.source,
               "calibration": {k: settings[k] for k in ("calibration", "nsamples", "seqlen", "seed")}}
    key = run_key("prune", *base, method, mode, settings["pattern"], result.ratios, stats is not None)
    report = prune_checkpoint(net, out, result.ratios, run_key=key, max_shard_size=max_shard_size,
                              report_extra=summary, method=method, pattern=settings["pattern"], mode=mode,
                              windows=windows, stats=stats, **engine)
    return {**report.to_json(), **summary, "out": str(out)}
