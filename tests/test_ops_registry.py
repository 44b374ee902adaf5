"""Promotion gate, `dlp promote`, `dlp models` and `dlp report` on a real MLflow SQLite registry.

The registry is built once per module with tasks/registry.log_variant_run (a tiny checkpoint, synthetic
metrics: uniform / OWL / DLP at three sparsities, dense baseline 20.0); every test works on its own copy of
the database file.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline import promotion as P
from pipeline import registry as reg

NAME = "tiny-llama-dlp"
DENSE_PPL = 20.0
DENSE_ZS = 0.55
N_BLOCKS = 12


def synthetic_variants():
    """(allocation, target sparsity, per-block sparsities, pruned ppl, zero-shot mean) x 9."""
    out = []
    for i, (alloc, p) in enumerate([(a, p) for a in ("uniform", "owl", "dlp") for p in (0.5, 0.6, 0.7)], 1):
        rnd = random.Random(i)
        if alloc == "uniform":
            blocks = [p] * N_BLOCKS
        else:
            amp = 0.08 if alloc == "owl" else 0.15
            blocks = [p - amp + 2 * amp * k / (N_BLOCKS - 1) + rnd.uniform(-0.005, 0.005) for k in range(N_BLOCKS)]
            shift = sum(blocks) / N_BLOCKS - p
            blocks = [b - shift for b in blocks]  # mean exactly p
        k = {"uniform": 3.0, "owl": 2.0, "dlp": 1.6}[alloc]
        ppl = DENSE_PPL * (1 + p ** 3 * k)
        zs = DENSE_ZS - p ** 2 * {"uniform": 0.15, "owl": 0.1, "dlp": 0.08}[alloc]
        out.append((alloc, p, blocks, ppl, zs))
    return out


def populate(ckpt: Path, tracking_uri: str, *, zero_shot: bool = True) -> list[dict]:
    results = []
    for i, (alloc, p, blocks, ppl, zs) in enumerate(synthetic_variants(), 1):
        metrics = {"ppl.pruned": ppl, "ppl.dense": DENSE_PPL, "sparsity.achieved": sum(blocks) / len(blocks)}
        if zero_shot:
            # the names pipeline/stages/register.py (variant_metrics) logs
            metrics.update({"zeroshot.mean_acc": zs, "zeroshot.mean_acc_delta": zs - DENSE_ZS,
                            "zeroshot.piqa.acc": zs + 0.02, "zeroshot.piqa.acc_dense": DENSE_ZS + 0.02,
                            "zeroshot.boolq.acc": zs - 0.02, "ppl.ratio": ppl / DENSE_PPL})
        results.append(reg.log_variant_run(
            registered_name=NAME, variant_key=f"key-{i}", checkpoint_dir=ckpt,
            params={"pruning": {"allocation": alloc, "sparsity": p}},
            metrics=metrics, block_sparsity=blocks, block_target=blocks,
            lineage={"base_model": "tiny-llama", "base_revision": "rev1", "method": "wanda", "allocation": alloc,
                     "sparsity": p, "alpha": 0.15 if alloc == "dlp" else None,
                     "statistic": "median" if alloc == "dlp" else None, "pattern": "unstructured"},
            experiment="dlp-ops-test", run_name=f"wanda-{alloc}-p{p}", pip_requirements=["torch"],
            tracking_uri=tracking_uri,
        ))
    return results


@pytest.fixture(scope="module")
def registry_template(tmp_path_factory, tiny_hf_checkpoint):
    root = tmp_path_factory.mktemp("ops-registry")
    uri = "sqlite:///" + (root / "mlflow.db").as_posix()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        populate(tiny_hf_checkpoint, uri)
    return root / "mlflow.db"


@pytest.fixture
def registry(registry_template, tmp_path, monkeypatch):
    """A private copy of the populated registry; MLFLOW_TRACKING_URI points at it. Yields the URI."""
    db = tmp_path / "mlflow.db"
    shutil.copy(registry_template, db)
    uri = "sqlite:///" + db.as_posix()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    monkeypatch.setenv("DLP_PROMOTED_BY", "test-operator")
    return uri


@pytest.fixture(scope="module")
def cli():
    from cli import app
    from cli.ops_commands import register

    names = {c.name for c in app.registered_commands}
    if "promote" not in names:
        register(app)
    return app


def run(app, *args):
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


# ============================================================================================ gate
def test_parse_gate():
    conds = P.parse_gate("ppl_ratio<=1.5, zero_shot_drop<=5%; sparsity>=0.6")
    assert [str(c) for c in conds] == ["ppl_ratio<=1.5", "zero_shot_drop<=0.05", "sparsity>=0.6"]
    for bad, msg in [("", "empty gate"), ("ppl_ratio=<1", "expected METRIC"), ("speed<=3", "unknown metric 'speed'"),
                     ("ppl_ratio<=abc", "expected METRIC")]:
        with pytest.raises(P.PromotionError, match=msg):
            P.parse_gate(bad)
    ok, text = P.Condition("sparsity", ">=", 0.6).check(0.59999999999999)  # float noise passes
    assert ok
    ok, text = P.Condition("sparsity", ">=", 0.6).check(0.59996)
    assert not ok and text == "sparsity=0.59996 < 0.6"
    assert P.Condition("zero_shot_drop", "<=", 0.05).check(None) == (False, "zero_shot_drop unavailable")


def test_load_variants_reads_metrics_and_lineage(registry):
    vs = P.load_variants(NAME)
    assert [v.version for v in vs] == list(range(1, 10))
    v9 = vs[-1]
    assert (v9.method, v9.allocation, v9.statistic, v9.alpha) == ("wanda", "dlp", "median", "0.15")
    assert v9.dense_ppl == DENSE_PPL and v9.ppl_ratio == pytest.approx(v9.ppl / DENSE_PPL)
    assert v9.zero_shot_drop == pytest.approx(DENSE_ZS - v9.zero_shot)
    assert len(v9.per_block) == N_BLOCKS and v9.target_sparsity == 0.7
    assert v9.zero_shot_tasks.keys() == {"piqa", "boolq"}
    assert v9.aliases == ["candidate"] and v9.base_revision == "rev1"


# ============================================================================================ promote
def test_promote_moves_champion_records_who_when_why(registry, cli):
    code, out, err = run(cli, "promote", NAME, "--gate", "ppl_ratio<=1.5,zero_shot_drop<=0.05,sparsity>=0.6")
    assert code == 0, err
    # passing: v5 owl-0.6 (1.432), v8 dlp-0.6 (1.346) -> lowest ratio wins
    assert "champion of tiny-llama-dlp -> v8" in out and "test-operator" in out
    client = reg.get_client()
    mv = client.get_model_version_by_alias(NAME, "champion")
    assert str(mv.version) == "8"
    tags = mv.tags
    assert tags["dlp.promoted_by"] == "test-operator" and tags["dlp.promotion_alias"] == "champion"
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", tags["dlp.promoted_at"])
    assert "ppl_ratio<=1.5" in tags["dlp.promotion_gate"] and "best of 2 passing" in tags["dlp.promotion_reason"]
    assert json.loads(tags["dlp.promotion_metrics"])["ppl_ratio"] == pytest.approx(1.3456)

    # again: nothing changes
    code, out, _ = run(cli, "promote", NAME, "--gate", "ppl_ratio<=1.5,zero_shot_drop<=0.05,sparsity>=0.6")
    assert code == 0 and "already champion" in out
    # a stricter sparsity moves the alias, the old champion is marked, history keeps both
    code, out, err = run(cli, "promote", NAME, "--gate", "sparsity>=0.65", "--reason", "ship 70%", "--by", "alice")
    assert code == 0, err
    assert "-> v9 (was v8) by alice" in out
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "9"
    assert client.get_model_version(NAME, "9").tags["dlp.promotion_reason"] == "ship 70%"
    assert client.get_model_version(NAME, "8").tags["dlp.demoted_for"] == "champion -> v9 by alice"
    history = json.loads(client.get_registered_model(NAME).tags[P.HISTORY_TAG])
    assert [(h["version"], h["by"]) for h in history] == [(8, "test-operator"), (9, "alice")]


def test_promote_refuses_naming_failures(registry, cli):
    code, out, err = run(cli, "promote", NAME, "--gate", "ppl_ratio<=1.1,sparsity>=0.6")
    assert code == 2 and out == ""
    line = err.strip()
    assert line.startswith("error: no version of 'tiny-llama-dlp' passes the gate ppl_ratio<=1.1,sparsity>=0.6")
    assert "v9: ppl_ratio=1.549 > 1.1" in line and "v4: ppl_ratio=1.25 > 1.1, sparsity=0.5 < 0.6" in line and "\n" not in line
    client = reg.get_client()
    assert "champion" not in client.get_registered_model(NAME).aliases
    # bad gate and unknown model: one line, exit 2
    assert run(cli, "promote", NAME, "--gate", "latency<=3")[0] == 2
    code, _, err = run(cli, "promote", "no-such-model", "--gate", "ppl_ratio<=2")
    assert code == 2 and "registered model 'no-such-model' not found" in err and "tiny-llama-dlp" in err


def test_promote_dry_run_and_versions_and_auto(registry, cli):
    code, out, _ = run(cli, "promote", NAME, "--gate", "ppl_ratio<=3", "--dry-run")
    assert code == 0 and out.startswith("would move champion of tiny-llama-dlp to v7")
    client = reg.get_client()
    assert "champion" not in client.get_registered_model(NAME).aliases
    code, out, _ = run(cli, "promote", NAME, "--gate", "ppl_ratio<=3", "--version", "3", "--version", "6", "--json")
    assert code == 0 and json.loads(out)["version"] == 6
    assert P.auto_promote(NAME, None) is None
    res = P.auto_promote(NAME, "ppl_ratio<=1.0", alias="prod")
    assert res.version is None and res.failures and "passes the gate" in res.reason
    res = P.auto_promote(NAME, "ppl_ratio<=1.3", alias="prod")
    assert res.version == 7 and res.by == "pipeline"
    assert str(client.get_model_version_by_alias(NAME, "prod").version) == "7"


def test_gate_on_missing_zero_shot(tmp_path, monkeypatch, tiny_hf_checkpoint):
    uri = "sqlite:///" + (tmp_path / "m.db").as_posix()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    reg.log_variant_run(registered_name="nozs", variant_key="a", checkpoint_dir=tiny_hf_checkpoint,
                        metrics={"ppl.pruned": 30.0, "ppl.dense": 20.0, "sparsity.achieved": 0.7},
                        lineage={"method": "wanda", "allocation": "dlp"}, pip_requirements=["torch"])
    with pytest.raises(P.PromotionError, match=r"v1: zero_shot_drop unavailable"):
        P.promote("nozs", "zero_shot_drop<=0.1")
    assert P.promote("nozs", "ppl_ratio<=1.5,sparsity>=0.7").version == 1


# ============================================================================================ models
def test_models_table_and_json(registry, cli):
    P.promote(NAME, "sparsity>=0.65,ppl_ratio<=1.6")  # v9 champion
    code, out, err = run(cli, "models", NAME)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[:6] == ["version", "aliases", "method", "allocation", "target", "sparsity"]
    assert len(lines) == 2 + 9
    v9 = lines[2].split()
    assert v9[0] == "9" and v9[1] == "candidate,champion" and v9[2] == "wanda" and v9[3] == "dlp"
    assert "30.976" in lines[2] and "1.549" in lines[2] and "0.5108" in lines[2] and "+0.0392" in lines[2]
    assert lines[-1].split()[:4] == ["1", "-", "wanda", "uniform"]
    code, out, _ = run(cli, "models", NAME, "--json")
    rows = json.loads(out)
    assert len(rows) == 9 and rows[0]["allocation"] == "uniform" and rows[8]["aliases"] == ["candidate", "champion"]
    code, _, err = run(cli, "models", "nope")
    assert code == 2 and err.startswith("error: registered model 'nope' not found")


def test_models_without_registry(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, _, err = run(cli, "models", NAME, "--workdir", str(tmp_path / "empty"))
    assert code == 2 and "no MLflow registry at" in err and not (tmp_path / "empty").exists()


# ============================================================================================ report
def test_report_html_self_contained_and_logged(registry, cli, tmp_path):
    P.promote(NAME, "sparsity>=0.65,ppl_ratio<=1.6")
    out_file = tmp_path / "rep" / "report.html"
    code, out, err = run(cli, "report", NAME, "--out", str(out_file))
    assert code == 0, err
    assert f"report of {NAME} (9 versions): {out_file.resolve()}" in out
    page = out_file.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # self-contained: no scripts, no external references (the SVG namespace is an identifier, not a fetch)
    assert "<script" not in page and "<link" not in page and "<img" not in page
    # (the SVG and XLink namespaces are identifiers, not fetches)
    assert set(re.findall(r"https?://[^\"' ]+", page)) == {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}
    assert page.count("<svg") == 2 and "Per-block sparsity of each variant" in page
    assert "Perplexity vs sparsity per allocation" in page
    for label in ("wanda/uniform", "wanda/owl", "wanda/dlp", "dense baseline", "v9 wanda-dlp-a0.15-70%"):
        assert label in page
    assert page.count('<g id="series-') == 9 + 3  # 9 profiles + 3 allocation series
    assert page.count('<tr class="champion">') == 1 and "Zero-shot accuracy per task" in page
    # logged to MLflow: the report run holds the page, the registered model points at it
    client = reg.get_client()
    tags = client.get_registered_model(NAME).tags
    run_id = tags["dlp.report_run_id"]
    assert [a.path for a in client.list_artifacts(run_id, "report")] == ["report/tiny-llama-dlp.html"]
    assert tags["dlp.report_uri"].endswith("/report/tiny-llama-dlp.html")
    # a second report reuses the run
    code, out, _ = run(cli, "report", NAME, "--out", str(tmp_path / "again.html"), "--json")
    assert code == 0 and json.loads(out)["mlflow_run_id"] == run_id
    code, _, err = run(cli, "report", "ghost", "--out", str(tmp_path / "g.html"))
    assert code == 2 and "not found" in err


def test_svg_chart_edge_cases():
    from pipeline.charts import line_chart, svg_markup
    from pipeline.report import render_html

    empty = svg_markup(line_chart([], title="t", xlabel="x", ylabel="y"))
    assert empty.startswith("<svg") and "no data" in empty and empty.rstrip().endswith("</svg>")
    one = svg_markup(line_chart([{"label": "a<b $x$", "x": [0, 1, 2], "y": [0.5, None, float("nan")]}],
                                title="t&", xlabel="x", ylabel="y", integer_x=True))
    assert "a&lt;b $x$" in one and "t&amp;" in one and "no data" not in one  # text as text, '$' kept literal
    assert one == svg_markup(line_chart([{"label": "a<b $x$", "x": [0, 1, 2], "y": [0.5, None, float("nan")]}],
                                        title="t&", xlabel="x", ylabel="y", integer_x=True))  # stable ids
    page = render_html("m", [])
    assert page.count("no data") == 2 and "0 version(s)" in page
