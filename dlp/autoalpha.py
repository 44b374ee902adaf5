"""Automatic alpha (and statistic) for DLP: never worse than uniform on the proxy, no hand tuning.

A candidate ``(alpha, statistic)`` gives the rates ``R_l = p + 2 alpha (u_l - mean u)`` from the cached
statistics (no calibration sweep). It is scored by the *proxy*: the pruned model's perplexity on
calibration windows held out from the statistics (same corpus and sampling, never the evaluation text).
Each candidate is pruned in place (``oneshot``: Wanda from the statistics needs no forward), so the dense
weights of the block linears are kept on the CPU and copied back before the next candidate and at the
end: the model comes back dense.

Search over ``alpha in [0, alpha_hi]``; ``alpha_hi`` keeps every block's rate in ``[margin, 1 - margin]``
(:func:`dlp.alpha_search.alpha_max`). A coarse grid from 0 (= uniform), then bisection around the best point
(:func:`dlp.alpha_search.search`). ``statistic="auto"`` runs the coarse grid for median and mean (uniform shared) and
refines the better one. SparseGPT candidates cost their OBS solves (about a fixed run each), so its search
is screened with Wanda candidates and SparseGPT itself then scores the finalists, uniform included.
Tie-break: the smallest alpha within ``rtol`` of the best proxy, so a flat curve gives 0 (uniform) and the
chosen proxy is never above uniform's (in the deciding stage).

Measured on SmolLM2-135M at 70% (``benchmarks/bench_autoalpha.py rank``): over an alpha grid for both
statistics, the proxy's ranking matches WikiText-2 perplexity with Spearman 0.93-0.96, and its argmin is
the real best grid point for Wanda, and (Wanda screen) for SparseGPT.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, MutableMapping

import torch
from torch import nn

from . import allocation
from .alpha_search import SearchResult, alpha_max, search  # the pure search; alpha_max and search re-exported
from .decoder import find_decoder
from .errors import DLPError
from .perplexity import perplexity
from .pruning import prune
from .statistics import BlockStatistics

STATISTICS = allocation.STATISTICS  # ("median", "mean")


# ------------------------------------------------------------------ dense weights
class DenseWeights:
    """A CPU copy of every block linear's weight, copied back after a candidate was pruned in place."""

    def __init__(self, model: nn.Module):
        layout = find_decoder(model)
        self.pairs = [(lin.weight, lin.weight.detach().to("cpu", copy=True))
                      for i in range(layout.num_blocks) for lin in layout.linears(i).values()]

    def restore(self) -> None:
        with torch.no_grad():
            for weight, dense in self.pairs:
                weight.copy_(dense)


# ------------------------------------------------------------------ the proxy
@dataclass
class ProxyCost:
    evaluations: int = 0
    block_passes: float = 0.0  # block forwards over the pruning windows, summed over candidates
    proxy_tokens: int = 0  # tokens the proxy's full-model forwards read
    prune_s: float = 0.0
    proxy_s: float = 0.0
    restore_s: float = 0.0

    def to_json(self) -> dict:
        return {"evaluations": self.evaluations, "block_passes": self.block_passes, "proxy_tokens": self.proxy_tokens,
                "prune_s": round(self.prune_s, 3), "proxy_s": round(self.proxy_s, 3),
                "restore_s": round(self.restore_s, 3)}


def candidate_key(method: str, alpha: float, statistic: str) -> str:
    """Cache key of a candidate (within one model, statistics, held-out set, pattern and sparsity);
    alpha 0 is uniform whatever the statistic."""
    return f"{method}:uniform:0" if alpha == 0 else f"{method}:{statistic}:{alpha:.10g}"


class Proxy:
    """``proxy(method, alpha, statistic) -> held-out perplexity`` of the model pruned with that candidate.

    ``cache`` (any mutable mapping, e.g. a pipeline's persistent store) maps :func:`candidate_key` to the
    proxy; cached candidates cost nothing. A candidate the pruner rejects (e.g. SparseGPT's Hessian at an
    extreme rate) scores +inf. Call :meth:`restore` when done: the model is pruned in place.
    """

    def __init__(self, model: nn.Module, stats: BlockStatistics, windows: torch.Tensor | None,
                 heldout: torch.Tensor, *, pattern: str, mode: str, sparsity: float, device: str = "cpu",
                 batch_size: int | None = None, cache: MutableMapping[str, float] | None = None):
        self.model, self.stats, self.windows = model, stats, windows
        self.heldout = heldout.reshape(heldout.shape[0], -1)
        self.pattern, self.mode, self.sparsity = pattern, mode, sparsity
        self.device, self.batch_size = device, batch_size
        self.cache = cache if cache is not None else {}
        self.dense: DenseWeights | None = None
        self.cost = ProxyCost()
        self.log: list[str] = []  # keys of the candidates evaluated (not cached), in order
        self._dirty = False

    def ratios(self, alpha: float, statistic: str) -> list[float]:
        if alpha == 0:
            return allocation.uniform(len(self.stats.blocks), self.sparsity).ratios
        return allocation.dlp(self.stats, self.sparsity, alpha, statistic).ratios

    def __call__(self, method: str, alpha: float, statistic: str) -> float:
        key = candidate_key(method, alpha, statistic)
        if key in self.cache:
            return float(self.cache[key])
        ratios = self.ratios(alpha, statistic)
        if self.dense is None:
            self.dense = DenseWeights(self.model)
        self.restore()
        self._dirty = True
        self.cost.evaluations += 1
        self.log.append(key)
        t = time.perf_counter()
        try:
            report = prune(self.model, ratios, method=method, pattern=self.pattern, mode=self.mode,
                           windows=self.windows, stats=self.stats, device=self.device, batch_size=self.batch_size)
        except DLPError:
            report = None
        self.cost.prune_s += time.perf_counter() - t
        if report is None:
            self.cache[key] = math.inf
            return math.inf
        self.cost.block_passes += report.block_passes
        t = time.perf_counter()
        n, seqlen = self.heldout.shape
        try:
            value = perplexity(self.model, self.heldout.reshape(1, -1), seqlen, device=self.device,
                               batch_size=self.batch_size)["ppl"]
        except OverflowError:
            value = math.inf
        self.cost.proxy_s += time.perf_counter() - t
        self.cost.proxy_tokens += n * seqlen
        value = value if math.isfinite(value) else math.inf
        self.cache[key] = value
        return value

    def restore(self) -> None:
        if self._dirty and self.dense is not None:
            t = time.perf_counter()
            self.dense.restore()
            self.cost.restore_s += time.perf_counter() - t
            self._dirty = False


# ------------------------------------------------------------------ result
@dataclass
class AlphaSearch:
    alpha: float
    statistic: str
    ratios: list[float]
    curve: list[dict]  # {alpha, statistic, proxy, pruner, stage, evaluation}; see choose_alpha
    alpha_max: dict[str, dict]  # per statistic: the exclusive (0, 1) bound and the searched end
    cost: dict
    settings: dict = field(default_factory=dict)

    def _final(self) -> list[dict]:
        stage = "confirm" if any(c["stage"] == "confirm" for c in self.curve) else "screen"
        return [c for c in self.curve if c["stage"] == stage]

    @property
    def proxy(self) -> float:
        """The chosen candidate's proxy (in the deciding stage)."""
        return next(c["proxy"] for c in self._final() if c["alpha"] == self.alpha
                    and (self.alpha == 0 or c["statistic"] == self.statistic))

    @property
    def uniform_proxy(self) -> float | None:
        return next((c["proxy"] for c in self._final() if c["alpha"] == 0), None)

    def allocation(self) -> allocation.Allocation:
        return allocation.Allocation("dlp", self.settings.get("sparsity"), list(self.ratios),
                                     {"alpha": self.alpha, "statistic": self.statistic, "alpha_search": "auto"})

    def to_json(self) -> dict:
        return {"alpha": self.alpha, "statistic": self.statistic, "proxy": self.proxy,
                "uniform_proxy": self.uniform_proxy, "ratios": self.ratios, "alpha_max": self.alpha_max,
                "curve": self.curve, "cost": self.cost, **self.settings}

    def save(self, folder: str | Path) -> tuple[Path, Path]:
        """Write ``alpha_search.json`` and ``alpha_search.png`` into ``folder``; return both paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "alpha_search.json"
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path, self.plot(folder / "alpha_search.png")

    def plot(self, path: str | Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for stage, pruner, stat in sorted({(c["stage"], c["pruner"], c["statistic"]) for c in self.curve}, reverse=True):
            pts = sorted((c["alpha"], c["proxy"]) for c in self.curve if (c["stage"], c["pruner"], c["statistic"])
                         == (stage, pruner, stat) and math.isfinite(c["proxy"]))
            if pts:
                ax.plot(*zip(*pts), marker="o" if stage == "screen" else "s", ls="-" if stage == "screen" else ":",
                        label=f"{stat} ({pruner} {stage})")
        if self.uniform_proxy is not None and math.isfinite(self.uniform_proxy):
            ax.axhline(self.uniform_proxy, color="grey", ls="--", lw=1, label="uniform")
        ax.axvline(self.alpha, color="red", lw=1, label=f"chosen α={self.alpha:.4f} ({self.statistic})")
        ax.set_xlabel("α")
        ax.set_ylabel("held-out perplexity (proxy)")
        ax.set_yscale("log")
        s = self.settings
        ax.set_title(f"{s.get('method')} {s.get('pattern')} p={s.get('sparsity')}: "
                     f"{self.cost['evaluations']} proxy evaluations, {self.cost['seconds']:.0f}s", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return Path(path)


# ------------------------------------------------------------------ entry points
def heldout_windows(tokenizer, source, nsamples: int, seqlen: int, seed: int, count: int) -> torch.Tensor:
    """``count`` windows drawn right after the ``nsamples`` calibration windows of the same seed: the same
    sampling, disjoint draws (an identical window, if any, is dropped), and the calibration set unchanged."""
    from .data import calibration_windows

    if count <= 0:
        raise DLPError(f"held-out windows must be a positive count, got {count}")
    drawn = calibration_windows(tokenizer, source, nsamples + count, seqlen, seed)
    calib, rest = drawn[:nsamples], drawn[nsamples:]
    keep = [w for w in rest if not (calib == w).all(dim=1).any()]
    if not keep:
        raise DLPError("every held-out window repeats a calibration window; use a larger calibration text")
    return torch.stack(keep)


def default_heldout_count(seqlen: int, tokens: int = 4096) -> int:
    """Held-out windows for the proxy: about ``tokens`` tokens (8 x 512 measured), at least 2 windows."""
    return max(2, math.ceil(tokens / seqlen))


def screen_method(method: str) -> str:
    """The pruner that scores the search's candidates: the pruner itself when a candidate is cheap (Wanda
    oneshot from the statistics needs no forward; magnitude needs no data), Wanda for SparseGPT, whose
    OBS solves cost about a whole fixed run per candidate; SparseGPT then confirms the finalists."""
    return "wanda" if method == "sparsegpt" else method


def default_budget(statistic: str) -> int:
    """Screening evaluations: 6 for one statistic, 8 for both (uniform shared)."""
    return 8 if statistic == "auto" else 6


def choose_alpha(model: nn.Module | Callable[[], nn.Module], stats: BlockStatistics, windows: torch.Tensor | None,
                 *, heldout: torch.Tensor, method: str = "wanda", pattern: str = "unstructured",
                 mode: str = "sequential", sparsity: float = 0.7, statistic: str = "median",
                 device: str = "cpu", budget: int | None = None, confirm: int = 2, proxy_mode: str = "oneshot",
                 prune_windows: int | None = None, alpha: float | None = None, coarse: int = 3,
                 margin: float = 0.01, rtol: float = 0.0, batch_size: int | None = None,
                 cache: MutableMapping[str, float] | None = None) -> AlphaSearch:
    """Choose DLP's alpha (and, with ``statistic="auto"``, the statistic) for this model, pruner, pattern
    and sparsity by minimising the held-out perplexity proxy (module docstring).

    Stage 1 (screen): :func:`search` per statistic with candidates pruned by :func:`screen_method` in
    ``proxy_mode`` (``oneshot``); ``budget`` evaluations in total (default :func:`default_budget`).
    Stage 2 (confirm, only when the screen used another pruner): the pruner itself scores uniform, the
    screened best and, with ``confirm >= 3``, that alpha times 2/3 (and so on: ``confirm`` candidates);
    the confirm stage decides. SparseGPT candidates are pruned with the first ``prune_windows``
    calibration windows (default: a quarter of them).

    ``model``: the dense model (or a factory returning it); it is left dense. ``windows``: the calibration
    windows the statistics came from; ``heldout``: windows NOT among them (:func:`heldout_windows`).
    ``mode``: the final run's mode (recorded only). ``alpha``: fix alpha and only choose the statistic (no
    uniform candidate). ``cache`` maps :func:`candidate_key` to the proxy (a pipeline may persist it per
    model, statistics, held-out set, pattern and sparsity); cached candidates cost nothing.
    Tie-break: the smallest alpha within ``rtol`` of the best proxy, then median before mean.
    """
    start = time.perf_counter()
    model = model if isinstance(model, nn.Module) else model()
    allocation.check_sparsity(sparsity)
    stat_names = list(STATISTICS) if statistic == "auto" else [statistic]
    if any(s not in STATISTICS for s in stat_names):
        raise DLPError(f"unknown statistic '{statistic}'; use one of: {', '.join(STATISTICS)}, auto")
    budget = budget if budget is not None else default_budget(statistic)
    if budget < 1:
        raise DLPError(f"the alpha search needs a budget of at least 1 proxy evaluation, got {budget}")
    if windows is not None and prune_windows is None:
        prune_windows = max(1, windows.shape[0] // 4)
    sub = windows[:prune_windows] if windows is not None else None
    proxy = Proxy(model, stats, sub, heldout, pattern=pattern, mode=proxy_mode, sparsity=sparsity,
                  device=device, batch_size=batch_size, cache=cache)
    bounds = {s: alpha_max(stats.statistic(s), sparsity) for s in stat_names}
    ends = {s: alpha_max(stats.statistic(s), sparsity, margin) for s in stat_names}
    if alpha is not None:
        stat_names = [s for s in stat_names if 0 <= alpha < bounds[s]]
        if not stat_names:
            raise DLPError(f"alpha={alpha} puts a block outside (0, 1) (alpha_max {max(bounds.values()):.4f}); lower alpha")
        ends = {s: alpha for s in stat_names}
    lo = alpha if alpha is not None else 0.0
    screen = screen_method(method)
    results: dict[str, SearchResult] = {}
    confirmed: dict[tuple[float, str], float] = {}
    try:
        shared: list[tuple[float, float]] = []  # uniform, evaluated once for both statistics
        for s in stat_names:  # one statistic: the whole search; auto: coarse grids first
            left = budget - proxy.cost.evaluations
            share = budget if len(stat_names) == 1 else min(coarse, len(shared) + left)
            results[s] = search(lambda a, s=s: proxy(screen, a, s), lo, ends[s], budget=share, coarse=coarse,
                                known=shared)
            shared = [(x, y) for x, y in results[s].points if x == 0.0]
        if len(stat_names) > 1:  # refine the better statistic with what is left
            best = min(stat_names, key=lambda s: (min(y for _, y in results[s].points), stat_names.index(s)))
            left = max(budget - proxy.cost.evaluations, 0)
            results[best] = search(lambda a: proxy(screen, a, best), lo, ends[best], coarse=coarse,
                                   budget=len(results[best].points) + left, known=results[best].points)
        screened = {(x, s): y for s, r in results.items() for x, y in r.points}
        chosen = _pick(screened, rtol, stat_names)
        if screen != method:
            if alpha is not None:  # a fixed alpha: the pruner compares the statistics
                finalists = [(alpha, s) for s in stat_names]
            else:  # uniform, the screened best, then shrinking it towards uniform
                shrunk = [(chosen[0] * (2 / 3) ** k, chosen[1]) for k in range(1, max(confirm - 1, 1))]
                finalists = list(dict.fromkeys([(0.0, chosen[1]), chosen, *shrunk]))[: max(confirm, 1)]
            for x, s in finalists:
                confirmed[(x, s)] = proxy(method, x, s)
            chosen = _pick(confirmed, rtol, stat_names)
    finally:
        proxy.restore()
    order = {k: i for i, k in enumerate(proxy.log)}

    def point(x, s, y, pruner, stage):
        return {"alpha": x, "statistic": s, "proxy": y, "pruner": pruner, "stage": stage,
                "evaluation": order.get(candidate_key(pruner, x, s))}

    curve = sorted([point(x, s, y, screen, "screen") for (x, s), y in screened.items()]
                   + [point(x, s, y, method, "confirm") for (x, s), y in confirmed.items()],
                   key=lambda c: (c["stage"] != "screen", c["statistic"], c["alpha"]))
    return AlphaSearch(
        alpha=chosen[0], statistic=chosen[1], ratios=proxy.ratios(*chosen), curve=curve,
        alpha_max={s: {"bound": bounds[s], "searched_to": ends[s]} for s in stat_names},
        cost={**proxy.cost.to_json(), "seconds": round(time.perf_counter() - start, 3)},
        settings={"method": method, "pattern": str(pattern), "mode": mode, "sparsity": sparsity,
                  "statistic_requested": statistic, "screen_pruner": screen, "proxy_mode": proxy_mode,
                  "budget": budget, "confirm": confirm if screen != method else 0, "coarse": coarse,
                  "margin": margin, "rtol": rtol, "prune_windows": None if sub is None else int(sub.shape[0]),
                  "heldout": {"windows": int(heldout.shape[0]), "seqlen": int(heldout.shape[-1])},
                  "proxy_kind": "perplexity on held-out calibration windows"})


def _pick(points: dict[tuple[float, str], float], rtol: float, stat_names: list[str]) -> tuple[float, str]:
    """The smallest alpha within ``rtol`` of the best proxy (median before mean on a tie)."""
    finite = [y for y in points.values() if math.isfinite(y)]
    ymin = min(finite) if finite else math.inf
    close = [k for k, y in points.items() if y <= ymin + rtol * abs(ymin)] if finite else list(points)
    return min(close, key=lambda k: (k[0], stat_names.index(k[1])))


def choose_alpha_from_text(model: nn.Module, tokenizer, stats: BlockStatistics, windows: torch.Tensor | None,
                           text, *, nsamples: int, seqlen: int, seed: int, heldout: int | None = None,
                           **kwargs) -> AlphaSearch:
    """:func:`choose_alpha` with its held-out windows drawn from the calibration text ``text`` right after the
    ``nsamples`` calibration windows (:func:`heldout_windows`; ``heldout`` windows, default
    :func:`default_heldout_count`). ``kwargs`` go to :func:`choose_alpha`."""
    count = heldout if heldout is not None else default_heldout_count(seqlen)
    held = heldout_windows(tokenizer, text, nsamples, seqlen, seed, count)
    return choose_alpha(model, stats, windows, heldout=held, **kwargs)
