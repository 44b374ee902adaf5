"""The alpha search's result: the choice, the proxy curve, the decision and its cost, as JSON and a plot."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .. import allocation


@dataclass
class AlphaSearch:
    alpha: float
    statistic: str
    ratios: list[float]
    curve: list[dict]  # {alpha, statistic, proxy, pruner, stage, evaluation}; see choose_alpha
    alpha_max: dict[str, dict]  # per statistic: the exclusive (0, 1) bound and the searched end
    cost: dict
    decision: dict = field(default_factory=dict)  # see decision.Decision.to_json
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
                "curve": self.curve, "cost": self.cost, "decision": self.decision, **self.settings}

    def save(self, folder: str | Path) -> tuple[Path, Path]:
        """Write ``alpha_search.json`` and ``alpha_search.png`` into ``folder``; return both paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "alpha_search.json"
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path, self.plot(folder / "alpha_search.png")

    def _title(self) -> str:
        s, d = self.settings, self.decision
        line = (f"{s.get('method')} {s.get('mode', '')} {s.get('pattern')} p={s.get('sparsity')}: "
                f"{self.cost['evaluations']} evaluations ({self.cost.get('cached', 0)} cached), "
                f"{self.cost['seconds']:.0f}s")
        if d and d.get("best") != d.get("baseline") and d.get("gain") is not None and d.get("lower") is not None:
            verdict = "kept the baseline" if d["kept_baseline"] else "took it"
            line += (f"\nbest α={d['best'][0]:.4f} ({d['best'][1]}): gain {d['gain']:+.4f} nats/token, "
                     f"lower {d['level']:.0%} bound {d['lower']:+.4f}: {verdict}")
        return line

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
        ax.set_title(self._title(), fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return Path(path)
