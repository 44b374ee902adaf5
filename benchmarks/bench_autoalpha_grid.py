"""Automatic alpha on a validation grid of the bundled SmolLM2-135M: does `--alpha auto` hold everywhere?

  # the grid: pruner x statistic x calibration x sparsity; rows uniform, alpha 0.15 and auto; resumable
  nohup nice -n 10 python benchmarks/bench_autoalpha_grid.py run --cache .bench/grid --json .bench/grid.json \\
      > .bench/grid.log 2>&1 &
  python benchmarks/bench_autoalpha_grid.py table --cache .bench/grid      # the table from the cache alone

  # one cell's truth curve: the real WikiText-2 perplexity over an alpha grid against each proxy scorer
  python benchmarks/bench_autoalpha_grid.py diagnose --cache .bench/grid --pruners sparsegpt \\
      --statistics mean --calibrations wikitext2-valid --sparsities 0.7 --alphas 0 0.05 0.1 0.15

Grid: pruners magnitude, wanda, sparsegpt x statistic mean, median x calibration C4, WikiText-2 validation
x sparsity 0.5, 0.6, 0.7. Calibration 32 x 512 windows, seed 0 (the demo's size, not the paper's 128 x 2048);
every prune is sequential (the default users get). Score: WikiText-2 test perplexity over the first 16 x 2048
tokens. Auto runs the library's default search (``choose_alpha_from_text``, default held-out count).

Resumable: everything lands in ``--cache`` as soon as it is computed -- the statistics per calibration
(``stats/``), every evaluated allocation keyed by pruner, calibration, sparsity and the rates themselves
(``evals/``: uniform is shared by both statistics, magnitude's by both calibrations, and an auto run that
lands on a rate vector already evaluated reuses it), every auto search's result (``auto/``, keyed by the
search's version) and every candidate the searches scored (``candidates/``, shared by all searches of one
calibration and sparsity). A killed run continues where it stopped.

Cost of a cell's auto row: statistics + search + final prune, over statistics + prune at alpha 0.15 (the
seconds of each step as measured when it ran; the machine is shared, so they are noisy).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DLP_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dlp import allocation, data  # noqa: E402
from dlp.errors import DLPError  # noqa: E402
from dlp.autoalpha.choose import default_heldout_count  # noqa: E402
from dlp.autoalpha.proxy import DenseWeights, Score, heldout_windows, window_losses  # noqa: E402
from dlp.models import load_model  # noqa: E402
from dlp.perplexity import perplexity  # noqa: E402
from dlp.pruning import prune  # noqa: E402
from dlp.statistics import BlockStatistics, collect_statistics  # noqa: E402
from pipeline.stages.rates import finite_json  # noqa: E402  (strict JSON: inf/NaN -> null)

PRUNERS = ["magnitude", "wanda", "sparsegpt"]
STATISTICS = ["mean", "median"]
CALIBRATIONS = ["c4", "wikitext2-valid"]
SPARSITIES = [0.5, 0.6, 0.7]
ROWS = ["uniform", "alpha", "auto"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_json(path: Path, body) -> None:
    """Atomic: a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=1))
    tmp.replace(path)


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


class JsonFileCache(dict):
    """The searches' candidate cache, written through to one JSON file after every new candidate."""

    def __init__(self, path: Path):
        super().__init__(read_json(path) or {})
        self.path = path

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        write_json(self.path, dict(self))


class GridCandidates(JsonFileCache):
    """The searches' candidate cache inside the grid. A candidate pruned by the final scorer (the pruner,
    sequential, all calibration windows) is the very model the grid evaluates at those rates, so such a
    candidate is served from the grid's evaluation when there is one (its first held-out losses: the
    search's default held-out windows are the first of the grid's), and one the search scores is evaluated
    by the grid right away, while the model is still pruned with it. ``hook_s``: time spent in those
    evaluations (not the search's). A served candidate counts with the seconds it would have cost."""

    def __init__(self, path: Path, grid: "Grid", cell: tuple, heldout: int):
        super().__init__(path)
        self.grid, self.cell, self.heldout, self.hook_s = grid, cell, heldout, 0.0
        pruner, _, calib, _ = cell
        self.final = f"{pruner}-sequential-{grid.args.nsamples}w" if pruner != "magnitude" else "magnitude"

    def _ratios(self, key: str) -> list[float] | None:
        tag, stat, alpha = key.split(":")
        if tag != self.final:
            return None
        stats = self.grid.calibration(self.cell[2])[2]
        return fixed_ratios(stats, self.cell[3], float(alpha), "median" if stat == "uniform" else stat)

    def _evaluated(self, key: str) -> dict | None:
        ratios = self._ratios(key)
        pruner, _, calib, sparsity = self.cell
        return None if ratios is None else read_json(eval_path(self.grid.root, pruner, calib, sparsity, ratios))

    def __contains__(self, key) -> bool:
        return dict.__contains__(self, key) or self._evaluated(key) is not None

    def __getitem__(self, key):
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        ev = self._evaluated(key)
        if ev is None:
            raise KeyError(key)
        n = self.heldout
        held_s = ev.get("heldout_s", ev["eval_s"] / 8) * n / len(ev["heldout_losses"])
        return Score.of(ev["heldout_losses"][:n], ev["prune_s"] + held_s).to_json()

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        ratios = self._ratios(key)
        if ratios is None or "sequential" not in key or self._evaluated(key) is not None:
            return
        t = time.perf_counter()
        pruner, _, calib, sparsity = self.cell
        held = self.grid.calibration(calib)[4]
        body = self.grid.score_pruned(ratios, held, value["seconds"], float("nan"))  # prune_s: with its proxy
        write_json(eval_path(self.grid.root, pruner, calib, sparsity, ratios), body)
        self.hook_s += time.perf_counter() - t


class Grid:
    """The model, the evaluation tokens and every calibration's windows and statistics, cached on disk."""

    def __init__(self, args):
        self.args, self.root = args, Path(args.cache)
        self.net, self.tok, ref = load_model(args.model)
        self.dense = DenseWeights(self.net)
        self.test_ids = data.evaluation_tokens(self.tok, data.load_text("wikitext2"))
        self.calib: dict[str, tuple] = {}
        log(f"loaded {ref.source}; cache {self.root}")

    def calibration(self, name: str) -> tuple:
        """(text, windows, statistics, statistics seconds, held-out windows); the statistics are computed
        once per calibration; the held-out windows are the ``--heldout`` draws after the calibration ones
        (the search's default 8 are their first 8)."""
        if name not in self.calib:
            a = self.args
            text = data.load_text(name)
            windows = data.calibration_windows(self.tok, text, a.nsamples, a.seqlen, a.seed)
            held = heldout_windows(self.tok, text, a.nsamples, a.seqlen, a.seed, a.heldout)
            default = heldout_windows(self.tok, text, a.nsamples, a.seqlen, a.seed, default_heldout_count(a.seqlen))
            if not torch.equal(default, held[: default.shape[0]]):
                raise SystemExit(f"{name}: the search's held-out windows are not the first of the grid's")
            path, meta = self.root / "stats" / f"{name}.safetensors", self.root / "stats" / f"{name}.json"
            if not meta.exists():
                self.dense.restore()
                t = time.perf_counter()
                stats = collect_statistics(self.net, windows)
                seconds = time.perf_counter() - t
                path.parent.mkdir(parents=True, exist_ok=True)
                stats.save(path)
                write_json(meta, {"seconds": seconds, "windows": list(windows.shape)})
                log(f"statistics {name}: {seconds:.1f}s")
            self.calib[name] = (text, windows, BlockStatistics.load(path), read_json(meta)["seconds"], held)
        return self.calib[name]

    def evaluate(self, pruner: str, calib: str, sparsity: float, ratios: list[float]) -> dict:
        """Prune the dense model sequentially at ``ratios`` and score it on the WikiText-2 test windows and
        (the final scorer's proxy, for the diagnosis) on the held-out windows; cached by the rates."""
        path = eval_path(self.root, pruner, calib, sparsity, ratios)
        found = read_json(path)
        if found is not None:
            return found
        _, windows, _, _, held = self.calibration(calib)
        self.dense.restore()
        report = prune(self.net, ratios, method=pruner, mode="sequential", windows=windows)
        body = self.score_pruned(ratios, held, report.seconds, report.overall)
        self.dense.restore()
        write_json(path, body)
        return body

    def score_pruned(self, ratios: list[float], held, prune_s: float, achieved: float) -> dict:
        """The model as pruned now: WikiText-2 perplexity, then the held-out windows' losses (timed apart)."""
        t = time.perf_counter()
        ppl = perplexity(self.net, self.test_ids, self.args.eval_seqlen, max_windows=self.args.eval_windows)["ppl"]
        eval_s = time.perf_counter() - t
        t = time.perf_counter()
        losses = window_losses(self.net, held)
        return {"ppl": ppl, "prune_s": prune_s, "eval_s": eval_s, "heldout_s": time.perf_counter() - t,
                "achieved": achieved, "ratios": ratios, "heldout_losses": losses}

    def auto(self, pruner: str, stat: str, calib: str, sparsity: float) -> dict:
        """The library's default auto search (cached per search version); its candidates shared with the
        grid's evaluations (:class:`GridCandidates`). ``search_s``: the search's own wall time, plus what the
        candidates served from a cache had cost when they were scored: the search's cost from cold."""
        from dlp.autoalpha import choose_alpha_from_text

        path = auto_path(self.root, pruner, stat, calib, sparsity)
        found = read_json(path)
        if found is None:
            a = self.args
            text, windows, stats = self.calibration(calib)[:3]
            heldout = default_heldout_count(a.seqlen)
            cache = GridCandidates(self.root / "candidates" / f"{calib}-p{sparsity:g}.json", self,
                                   (pruner, stat, calib, sparsity), heldout)
            self.dense.restore()
            t = time.perf_counter()
            result = choose_alpha_from_text(self.net, self.tok, stats, windows, text, nsamples=a.nsamples,
                                            seqlen=a.seqlen, seed=a.seed, method=pruner, mode="sequential",
                                            sparsity=sparsity, statistic=stat, cache=cache)
            wall = time.perf_counter() - t - cache.hook_s
            found = {"search_s": wall + result.cost["cached_s"], "search_wall_s": wall, "alpha": result.alpha,
                     "statistic": result.statistic, "ratios": result.ratios, "search": finite_json(result.to_json())}
            write_json(path, found)
        return found


def eval_path(root: Path, pruner: str, calib: str, sparsity: float, ratios: list[float]) -> Path:
    """Where an evaluated allocation is cached: by the rates themselves."""
    digest = hashlib.sha256(json.dumps([round(r, 12) for r in ratios]).encode()).hexdigest()[:16]
    return root / "evals" / f"{pruner}-{calib}-p{sparsity:g}-{digest}.json"


def auto_path(root: Path, pruner: str, stat: str, calib: str, sparsity: float) -> Path:
    """Where an auto search's result is cached: under the search's version (a new rule searches again,
    re-using every candidate already scored)."""
    from dlp.autoalpha import SEARCH_VERSION

    return root / "auto" / SEARCH_VERSION / f"{pruner}-{calib}-{stat}-p{sparsity:g}.json"


def fixed_ratios(stats: BlockStatistics, sparsity: float, alpha: float, stat: str) -> list[float] | None:
    """The rates of a fixed alpha; None where a block would leave (0, 1)."""
    if alpha == 0:
        return allocation.uniform(len(stats.blocks), sparsity).ratios
    try:
        return allocation.dlp(stats, sparsity, alpha, stat).ratios
    except DLPError:
        return None


def cells(args):
    """In the order given: sparsity, then calibration, pruner, statistic."""
    for sparsity in args.sparsities:
        for calib in args.calibrations:
            for pruner in args.pruners:
                for stat in args.statistics:
                    yield pruner, stat, calib, sparsity


def run_cell(grid: Grid, row: str, cell: tuple) -> None:
    pruner, stat, calib, sparsity = cell
    stats = grid.calibration(calib)[2]
    if row == "uniform":
        out = grid.evaluate(pruner, calib, sparsity, fixed_ratios(stats, sparsity, 0.0, stat))
    elif row == "alpha":
        ratios = fixed_ratios(stats, sparsity, grid.args.alpha, stat)
        if ratios is None:
            return log(f"alpha   {pruner:9s} {stat:6s} {calib:15s} p={sparsity:g}: alpha {grid.args.alpha} out of range")
        out = grid.evaluate(pruner, calib, sparsity, ratios)
    else:
        found = grid.auto(pruner, stat, calib, sparsity)
        out = {**grid.evaluate(pruner, calib, sparsity, found["ratios"]), "alpha": found["alpha"],
               "statistic": found["statistic"]}
    log(f"{row:7s} {pruner:9s} {stat:6s} {calib:15s} p={sparsity:g}: ppl {out['ppl']:.2f}"
        + (f" (alpha {out['alpha']:.4f} {out['statistic']})" if row == "auto" else ""))


def collect(args) -> list[dict]:
    """Every grid cell whose rows are all in the cache (``table`` computes nothing)."""
    root, rows = Path(args.cache), []
    for pruner, stat, calib, sparsity in cells(args):
        meta = read_json(root / "stats" / f"{calib}.json")
        auto = read_json(auto_path(root, pruner, stat, calib, sparsity))
        if meta is None:
            continue
        stats = BlockStatistics.load(root / "stats" / f"{calib}.safetensors")

        def ev(ratios):
            return None if ratios is None else read_json(eval_path(root, pruner, calib, sparsity, ratios))

        uni = ev(fixed_ratios(stats, sparsity, 0.0, stat))
        fix = ev(fixed_ratios(stats, sparsity, args.alpha, stat))
        aut = ev(auto["ratios"]) if auto else None
        row = {"pruner": pruner, "statistic": stat, "calibration": calib, "sparsity": sparsity,
               "uniform": uni and uni["ppl"], "alpha": fix and fix["ppl"], "auto": aut and aut["ppl"]}
        if auto and aut and fix:
            s = meta["seconds"]
            row.update(chosen_alpha=auto["alpha"], chosen_statistic=auto["statistic"],
                       evaluations=auto["search"]["cost"]["evaluations"],
                       cost=(s + auto["search_s"] + aut["prune_s"]) / (s + fix["prune_s"]),
                       auto_s={"statistics": s, "search": auto["search_s"], "prune": aut["prune_s"]},
                       alpha_s={"statistics": s, "prune": fix["prune_s"]})
        rows.append(row)
    return rows


def print_table(rows: list[dict], alpha: float) -> None:
    f = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"| pruner | statistic | calibration | p | uniform | α={alpha:g} | auto | chosen α (statistic) | "
          f"auto / uniform | auto / best fixed | cost × α run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        best = min([v for v in (r["uniform"], r["alpha"]) if v is not None], default=None)
        vs_u = r["auto"] / r["uniform"] if r["auto"] and r["uniform"] else None
        vs_b = r["auto"] / best if r["auto"] and best else None
        chosen = f"{r['chosen_alpha']:.4f} ({r['chosen_statistic']})" if "chosen_alpha" in r else "–"
        cost = f"{r['cost']:.2f}" if "cost" in r else "–"
        print(f"| {r['pruner']} | {r['statistic']} | {r['calibration']} | {r['sparsity']:g} | {f(r['uniform'])} | "
              f"{f(r['alpha'])} | {f(r['auto'])} | {chosen} | {f(vs_u) if vs_u is None else f'{vs_u:.3f}'} | "
              f"{f(vs_b) if vs_b is None else f'{vs_b:.3f}'} | {cost} |")


def run(args) -> None:
    """Cell by cell in the order given (``--cells-first``: each cell's rows together), else row by row."""
    grid = Grid(args)
    order = ([(row, cell) for cell in cells(args) for row in args.rows] if args.cells_first
             else [(row, cell) for row in args.rows for cell in cells(args)])
    for row, cell in order:
        run_cell(grid, row, cell)
        if args.json:
            write_json(Path(args.json), {"rows": collect(args), "settings": vars(args)})
    table(args)


def table(args) -> None:
    rows = collect(args)
    print_table(rows, args.alpha)
    if args.json:
        write_json(Path(args.json), {"rows": rows, "settings": vars(args)})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["run", "table", "diagnose"])
    ap.add_argument("--cache", default=".bench/grid", help="the resumable cache folder")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pruners", nargs="+", default=PRUNERS)
    ap.add_argument("--statistics", nargs="+", default=STATISTICS)
    ap.add_argument("--calibrations", nargs="+", default=CALIBRATIONS)
    ap.add_argument("--sparsities", nargs="+", type=float, default=SPARSITIES)
    ap.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    ap.add_argument("--alpha", type=float, default=0.15, help="the fixed-alpha row")
    ap.add_argument("--cells-first", action="store_true", help="run: every row of a cell before the next cell")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.0, 0.05, 0.1, 0.15], help="diagnose: alpha grid")
    ap.add_argument("--heldout", type=int, default=32, help="held-out windows scored with every evaluated model")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.what == "run":
        run(args)
    elif args.what == "table":
        table(args)
    else:
        from bench_autoalpha_diagnose import diagnose

        diagnose(Grid(args), args)


if __name__ == "__main__":
    main()
