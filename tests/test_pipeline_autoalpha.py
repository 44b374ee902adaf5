"""`pruning.alpha: auto` in the pipeline (tiny random Llama, real tokenizer and text; plumbing, never quality):
the rates stage runs the search from the cached statistics, every candidate is cached on its own (a search
killed half-way resumes without re-scoring what it finished; another budget re-scores only new candidates),
the chosen alpha lands in the summary, the rates artifact and the registry (tags, metrics, the proxy curve as
JSON + PNG), and the sweep accepts `auto` among its alphas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_pipeline_flow import Runner, computed, tiny_job, tiny_model  # noqa: F401 (fixture)

pytest_plugins = ["tests.conftest_pipeline"]

AUTO = {"alpha": "auto", "search": {"budget": 4, "heldout": 2}}


def _count(trace: Path, line: str) -> int:
    return sum(1 for x in trace.read_text().split() if x == line)


def _candidates(found: dict) -> set[tuple]:
    """The candidates a search scored or read, from its stored curve: (pruner, alpha, statistic)."""
    curve = json.loads(Path(found["curve_uri"].removeprefix("file://")).read_text())["curve"]
    return {(c["pruner"], c["alpha"], c["statistic"] if c["alpha"] else None) for c in curve}


@pytest.fixture(scope="module")
def auto_run(tiny_model, tmp_path_factory, prefect_harness):
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path_factory.mktemp("pipeline-auto")
    runner = Runner(tiny_model, root / "work", root / "trace.txt")
    summary = runner.run(mp, pruning=AUTO)
    first = runner.computed()
    candidates = _count(runner.trace, "alpha-candidate:computed")
    mp.undo()
    return runner, summary, first, candidates


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return monkeypatch


def test_auto_run_chooses_alpha_from_the_statistics_and_reports_it(auto_run):
    runner, s, first, candidates = auto_run
    found = s["alpha_search"]
    assert {"statistics", "rates", "prune", "register"} <= first
    # the budget of 4 screened by Wanda one-shot, then uniform and the best confirmed by Wanda sequential
    confirmed = {(a, st) for p, a, st in _candidates(found) if p == found["final_pruner"]}
    assert (0.0, None) in confirmed and len(confirmed) == found["confirm"] in (1, 2)  # 1: the screen's best is uniform
    assert candidates == found["evaluations"] == 4 + found["confirm"] and found["cached_candidates"] == 0
    assert found["final_pruner"].startswith("wanda-sequential-") and found["decision"]["baseline"][0] == 0.0
    bound = found["alpha_max"]["median"]["bound"]
    assert 0.0 <= found["alpha"] < bound and found["statistic"] == "median"
    assert found["uniform_proxy"] is not None and found["proxy"] <= found["uniform_proxy"]  # never worse than uniform
    assert s["allocation"] == {"allocation": "dlp", "alpha": found["alpha"], "statistic": "median"}
    targets = [b["target"] for b in s["per_block"]]
    assert sum(targets) / len(targets) == pytest.approx(0.5, abs=1e-6)
    if found["alpha"] > 0:
        assert max(targets) - min(targets) == pytest.approx(2 * found["alpha"], abs=1e-6)
    curve = json.loads(Path(found["curve_uri"].removeprefix("file://")).read_text())
    assert curve["alpha"] == found["alpha"] and len(curve["curve"]) == found["points"] >= 4 + 1
    assert any(c["alpha"] == 0.0 for c in curve["curve"])  # uniform is always a candidate
    assert Path(found["plot_uri"].removeprefix("file://")).read_bytes()[:4] == b"\x89PNG"
    assert "a-auto" in s["variant"]


def test_auto_variant_in_the_registry_has_the_chosen_alpha_and_the_curve(auto_run):
    from pipeline.registry import get_client

    runner, s, _, _ = auto_run
    client = get_client(None, runner.workdir)
    mv = client.get_model_version("tiny-llama-dlp", s["version"])
    assert mv.tags["dlp.alpha"] == str(s["alpha_search"]["alpha"]) and mv.tags["dlp.alpha_requested"] == "auto"
    run = client.get_run(mv.run_id)
    assert run.data.metrics["alpha_search.proxy"] == pytest.approx(s["alpha_search"]["proxy"])
    assert run.data.metrics["alpha_search.evaluations"] == s["alpha_search"]["evaluations"]
    assert run.data.params["pruning.alpha"] == "auto"
    files = {a.path for a in client.list_artifacts(run.info.run_id, "alpha_search")}
    assert files == {"alpha_search/alpha_search.json", "alpha_search/alpha_search.png"}


def test_auto_rerun_recomputes_nothing(auto_run, env):
    runner, s, _, _ = auto_run
    again = runner.run(env, pruning=AUTO)
    assert runner.computed() == set() and again["version"] == s["version"]
    assert again["alpha_search"] == s["alpha_search"]


def test_another_budget_reuses_every_scored_candidate(auto_run, env):
    runner, s, _, _ = auto_run
    more = runner.run(env, pruning={**AUTO, "search": {"budget": 6, "heldout": 2}})
    assert "statistics" not in runner.computed() and "rates" in runner.computed()
    found = more["alpha_search"]
    new = _candidates(found) - _candidates(s["alpha_search"])  # two more screened, perhaps another finalist
    assert found["evaluations"] == len(new) >= 2 and _count(runner.trace, "alpha-candidate:computed") == len(new)
    assert found["cached_candidates"] == len(_candidates(found)) - len(new)  # uniform and the first 4 at least


def test_search_killed_half_way_resumes_with_the_same_choice(auto_run, tiny_model, tmp_path, env):
    from pipeline.cache import InjectedFailure

    runner, _, _, _ = auto_run
    job = {**AUTO, "sparsity": 0.4}
    with pytest.raises(InjectedFailure):
        runner.run(env, fail="alpha-candidate:computed", pruning=job)
    assert _count(runner.trace, "alpha-candidate:computed") == 1 and "rates" not in runner.computed()
    resumed = runner.run(env, pruning=job)
    found = resumed["alpha_search"]  # the finished candidate is not scored again
    assert _count(runner.trace, "alpha-candidate:computed") == found["evaluations"] == 4 + found["confirm"] - 1
    assert found["cached_candidates"] == 1

    fresh = Runner(tiny_model, tmp_path / "fresh", tmp_path / "trace.txt").run(env, pruning=job)  # uninterrupted
    assert fresh["alpha_search"]["alpha"] == resumed["alpha_search"]["alpha"]
    assert [b["target"] for b in fresh["per_block"]] == [b["target"] for b in resumed["per_block"]]
    assert fresh["weights_sha256"] == resumed["weights_sha256"]


def test_statistic_auto_with_a_fixed_alpha_picks_a_statistic(auto_run, env):
    runner, _, _, _ = auto_run
    s = runner.run(env, pruning={"alpha": 0.1, "statistic": "auto", "search": {"heldout": 2}})
    assert s["alpha_search"]["alpha"] == 0.1 and s["allocation"]["statistic"] in ("median", "mean")
    assert s["alpha_search"]["points"] == 2  # one candidate per statistic, no uniform candidate
    assert s["alpha_search"]["decision"]["baseline"] == [0.1, "median"]  # the mean only if it wins beyond the noise


def test_sweep_with_auto_among_the_alphas(tiny_model, tmp_path, prefect_harness, env):
    from flows.sweep import sweep

    res = sweep(job=tiny_job(tiny_model, tmp_path / "work", pruning={"search": {"budget": 3, "heldout": 2}}),
                methods=["wanda"], allocations=["dlp"], sparsities=[0.5], alphas=[0.1, "auto"])
    assert not res["failed"] and len(res["variants"]) == 2
    rows = {r["alpha"]: r for r in res["rows"]}
    assert rows[0.1]["chosen"] == "0.1 median"
    auto = next(v for v in res["variants"] if v["alpha_search"])
    assert rows["auto"]["chosen"] == f"{auto['alpha_search']['alpha']:.4g} median"
    assert "a-auto" in res["table"]


def test_cli_flags_accept_auto(tmp_path):
    from dlp.errors import DLPError
    from cli.pipeline_commands import _alpha, _split

    assert _alpha("auto") == "auto" and _alpha("0.2") == 0.2 and _alpha(None) is None
    assert _split("0,0.15,auto", _alpha) == [0.0, 0.15, "auto"]
    with pytest.raises(DLPError, match="auto"):
        _split("0.1,big", _alpha)
