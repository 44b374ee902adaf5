"""Registered variants stored as masks over their base (pipeline.mask_registry, pipeline.mask_model) on a real
SQLite MLflow: the version holds only the pack, names its base by content sha256 and URI, loads through
``mlflow.pyfunc.load_model`` to the very tensors of the dense variant (sha256 of each), the base is logged once,
and a base whose content changed is refused in one line. Tiny random models: structure only."""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
import torch

from dlp import maskstore
from dlp.models import folder_fingerprint
from pipeline import mask_registry as mr
from pipeline import registry as reg

pytest_plugins = ["tests.conftest_pipeline"]

NAME = "tiny-masks"


def _variant(base: Path, out: Path, method: str, dtype: torch.dtype = torch.float32) -> Path:
    """``base`` pruned with ``method`` (2 windows of random tokens), saved in ``dtype`` with its tokenizer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from dlp import pruning
    from dlp.checkpoint import save_checkpoint

    model = LlamaForCausalLM.from_pretrained(base).eval()
    windows = torch.randint(4, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    report = pruning.prune(model, [0.5, 0.6], method=method, windows=windows)
    save_checkpoint(model.to(dtype), AutoTokenizer.from_pretrained(base), out, report.to_json())
    return out


def _tensor_digests(folder: Path) -> dict[str, str]:
    from safetensors import safe_open

    out = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as fh:
            out.update({n: maskstore.tensor_sha256(fh.get_tensor(n)) for n in fh.keys()})
    return out


def _register(ckpt: Path, key: str, base: Path | None, storage: str = "masks", experiment: str = "dlp-masks"):
    return reg.log_variant_run(registered_name=NAME, variant_key=key, checkpoint_dir=ckpt, experiment=experiment,
                               lineage={"method": key}, run_name=key, pip_requirements=["torch"],
                               storage=storage, base_dir=base, base_source="tiny")


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_hf_checkpoint):
    """One SQLite registry for the module with a Wanda (mask, float32) and a SparseGPT (mask+values, bfloat16)
    variant registered as masks over one float32 base: (root, base, {method: (dense folder, registration)})."""
    import mlflow

    root = tmp_path_factory.mktemp("mask-registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", "sqlite:///" + (root / "mlflow.db").as_posix())
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        mp.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(k, "1")
        base = Path(shutil.copytree(tiny_hf_checkpoint, root / "base"))
        variants = {}
        for method, dtype in (("wanda", torch.float32), ("sparsegpt", torch.bfloat16)):
            dense = _variant(base, root / method, method, dtype)
            variants[method] = dense, _register(dense, method, base)
        yield root, base, variants
        while mlflow.active_run() is not None:
            mlflow.end_run()


def _base_runs(client, experiment: str = "dlp-masks") -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string="tags.`dlp.kind` = 'base-checkpoint'")


@pytest.mark.parametrize("method,kind", [("wanda", "mask"), ("sparsegpt", "mask+values")])
def test_version_holds_only_the_pack_and_names_its_base(registry, method, kind, tmp_path):
    import mlflow

    _, base, variants = registry
    dense, res = variants[method]
    client = reg.get_client()
    tags = client.get_model_version(NAME, res["version"]).tags
    assert tags[mr.STORAGE_TAG] == "masks" and tags[mr.BASE_SHA_TAG] == folder_fingerprint(base)
    assert tags[mr.BASE_URI_TAG].endswith("/checkpoint") and tags["dlp.method"] == method
    assert int(tags[mr.BYTES_STORED_TAG]) < int(tags[mr.BYTES_DENSE_TAG]) == maskstore.folder_bytes(dense)
    assert client.get_run(res["run_id"]).data.metrics["storage.ratio"] == pytest.approx(
        int(tags[mr.BYTES_STORED_TAG]) / maskstore.folder_bytes(dense))
    logged = Path(mlflow.artifacts.download_artifacts(res["model_uri"], dst_path=str(tmp_path / "dl")))
    assert [p.name for p in logged.rglob("*.safetensors")] == [maskstore.STORE]  # no dense copy in the version
    kinds = {t["kind"] for t in maskstore.read_manifest(logged / "artifacts" / "variant")["tensors"].values()}
    assert kinds == {"base", kind}
    [base_run] = _base_runs(client)  # both variants refer to the one logged base
    assert base_run.data.tags[mr.BASE_SHA_TAG] == tags[mr.BASE_SHA_TAG]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_registered_variant_loads_through_mlflow_bit_exactly(registry, method):
    import mlflow

    dense, res = registry[2][method]
    loaded = mlflow.pyfunc.load_model(res["model_uri"])
    model = loaded.unwrap_python_model()
    want = _tensor_digests(dense)
    assert _tensor_digests(model.path) == want  # the materialised folder, tensor by tensor
    state = model.model.state_dict()
    assert {n: maskstore.tensor_sha256(state[n]) for n in want} == want  # and the weights transformers loaded
    out = loaded.predict(["w1 w2 w3"], params={"max_new_tokens": 3})
    assert isinstance(out, list) and len(out) == 1 and len(model.tokenizer(out[0]).input_ids) <= 3


def test_reused_run_and_dense_storage(registry, monkeypatch):
    from tests.conftest_pipeline import registry_down_once

    root, base, variants = registry
    client = reg.get_client()
    dense = variants["wanda"][0]
    registry_down_once(monkeypatch)  # a crash after logging: the rerun reuses the run and still tags the version
    with pytest.raises(RuntimeError, match="simulated"):
        _register(dense, "retry", base)
    again = _register(dense, "retry", base)
    assert len(_base_runs(client)) == 1
    tags = client.get_model_version(NAME, again["version"]).tags
    first = client.get_model_version(NAME, variants["wanda"][1]["version"]).tags
    assert {k: tags[k] for k in mr.STORAGE_TAGS} == {k: first[k] for k in mr.STORAGE_TAGS}

    plain = client.get_model_version(NAME, _register(dense, "plain", None, storage="dense")["version"]).tags
    assert plain[mr.STORAGE_TAG] == "dense" and mr.BASE_SHA_TAG not in plain
    assert plain[mr.BYTES_STORED_TAG] == plain[mr.BYTES_DENSE_TAG] == first[mr.BYTES_DENSE_TAG]


def test_changed_base_is_refused_in_one_line(registry, tmp_path, capsys):
    import mlflow

    from cli import main
    from dlp.errors import DLPError
    from tests.conftest_pipeline import make_tiny_checkpoint

    root, base, variants = registry
    res = _register(variants["wanda"][0], "changed", base, experiment="dlp-masks-changed")  # its own base copy
    pack = Path(mlflow.artifacts.download_artifacts(res["model_uri"], dst_path=str(tmp_path / "dl"))) / "artifacts" / "variant"
    changed = Path(shutil.copytree(base, tmp_path / "base"))
    other = make_tiny_checkpoint(tmp_path / "other", seed=1) / "model.safetensors"
    shutil.copy2(other, changed / "model.safetensors")  # a base whose content changed since packing
    logged = Path(url2pathname(urlparse(reg.get_client().get_model_version(NAME, res["version"]).tags[mr.BASE_URI_TAG]).path))
    shutil.copy2(other, logged / "model.safetensors")  # and the base copy the version reads
    with pytest.raises(DLPError, match="changed since the variant was packed") as err:
        mlflow.pyfunc.load_model(res["model_uri"])
    assert "\n" not in str(err.value)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["materialize", str(pack), "--base", str(changed), "--out", str(tmp_path / "back")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "changed since the variant was packed" in lines[0] and "pass that original base checkpoint" in lines[0]
    assert not (tmp_path / "back").exists()


def test_bad_storage_is_refused_before_any_run(registry):
    client = reg.get_client()
    with pytest.raises(ValueError, match="needs the base checkpoint"):
        _register(registry[1], "x", None, experiment="dlp-masks-bad")
    with pytest.raises(ValueError, match="unknown registry storage 'zip'"):
        _register(registry[1], "y", registry[1], storage="zip", experiment="dlp-masks-bad")
    assert client.search_runs([client.get_experiment_by_name("dlp-masks-bad").experiment_id]) == []


def test_models_table_shows_bytes_stored_vs_dense(registry, capsys):
    from cli import main

    _, _, variants = registry
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["models", NAME])
    out = capsys.readouterr().out
    assert exc.value.code in (0, None), out
    header, _, *rows = out.strip().splitlines()
    assert "stored" in header and "of dense" in header
    by_method = {r.split()[2]: r for r in rows}  # version, aliases ("-" or names), method
    for method, (dense, res) in variants.items():
        tags = reg.get_client().get_model_version(NAME, res["version"]).tags
        share = f"{int(tags[mr.BYTES_STORED_TAG]) / int(tags[mr.BYTES_DENSE_TAG]):.1%}"
        assert f"{int(tags[mr.BYTES_STORED_TAG]) / 2**20:.1f} MiB masks" in by_method[method] and share in by_method[method]


def test_a_remote_base_is_downloaded_once_into_the_cache(registry, tmp_path, monkeypatch):
    """A base URI that is no local folder (here ``runs:/``, as s3:// or mlflow-artifacts:/ would be) is
    downloaded into DLP_CACHE_DIR/bases/<sha256> once and read from there after."""
    import mlflow

    from pipeline.mask_model import base_folder

    monkeypatch.setenv("DLP_CACHE_DIR", str(tmp_path / "cache"))
    client = reg.get_client()
    [run] = _base_runs(client)
    sha = run.data.tags[mr.BASE_SHA_TAG]
    got = base_folder(f"runs:/{run.info.run_id}/checkpoint", sha)
    assert got == tmp_path / "cache" / "bases" / sha and folder_fingerprint(got) == sha
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", lambda **_: pytest.fail("downloaded twice"))
    assert base_folder(f"runs:/{run.info.run_id}/checkpoint", sha) == got
