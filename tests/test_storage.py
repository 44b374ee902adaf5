"""Artifact store (local + moto S3), manifests, and the S3 preflight check."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from pipeline import digests
from pipeline import s3 as s3_mod
from pipeline.manifest import Manifest, load_verified, manifest_key, read_manifest, verify, write_manifest
from pipeline.local import LocalStore
from pipeline.preflight import PreflightError, check_s3
from pipeline.s3 import S3Store
from pipeline.store import (
    COMPLETE_MARKER,
    ArtifactMissing,
    CorruptArtifact,
    StorageError,
    dir_digest,
    hash_dir,
    normalize_key,
    open_store,
    sha256_file,
)

pytest_plugins = ["tests.conftest_pipeline"]


# --------------------------------------------------------------------------------------------- helpers
def _make_tree(root: Path) -> Path:
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "model.safetensors").write_bytes(os.urandom(300_000))
    (root / "sub" / "x.bin").write_bytes(b"\x00" * 1000)
    (root / "sub" / "deep" / "y.txt").write_text("hello")
    return root


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return S3Store(bucket.prefix_uri("artifacts"), endpoint_url=bucket.endpoint_url)


def _raw_put(store, key: str, data: bytes) -> None:
    """Write bytes behind the store's back (simulates corruption / a crashed writer)."""
    store.fs.pipe_file(store.path(key), data)


# --------------------------------------------------------------------------------------------- basics
def test_normalize_key():
    assert normalize_key("/a//b/c/") == "a/b/c"
    for bad in ("", "/", "a/../b", "./a", ".."):
        with pytest.raises(StorageError):
            normalize_key(bad)


def test_dir_digest_is_order_independent():
    a = dir_digest([("b", "2" * 64), ("a", "1" * 64)])
    b = dir_digest([("a", "1" * 64), ("b", "2" * 64)])
    assert a == b and len(a) == 64
    assert a != dir_digest([("a", "1" * 64), ("b", "3" * 64)])


def test_open_store_uris(tmp_path, monkeypatch):
    s = open_store(None, workdir=tmp_path / "w")
    assert isinstance(s, LocalStore) and s.root == (tmp_path / "w" / "artifacts").resolve()
    s = open_store((tmp_path / "x").as_uri())
    assert isinstance(s, LocalStore) and s.root == (tmp_path / "x").resolve()
    monkeypatch.chdir(tmp_path)
    s = open_store("rel/store")
    assert s.root == (tmp_path / "rel" / "store").resolve()
    assert s.uri("a/b") == (tmp_path / "rel" / "store" / "a" / "b").resolve().as_uri()
    s3 = open_store("s3://bkt/some/prefix", endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3Store) and s3.bucket == "bkt" and s3.prefix == "some/prefix"
    assert s3.uri("k/v.json") == "s3://bkt/some/prefix/k/v.json"
    assert open_store("s3://bkt").uri("k") == "s3://bkt/k"
    with pytest.raises(StorageError):
        open_store("gs://bucket/x")


def test_s3_endpoint_from_env(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3.example:9000")
    assert s3_mod.resolve_s3_endpoint() == "http://s3.example:9000"
    assert s3_mod.resolve_s3_endpoint("http://explicit:1") == "http://explicit:1"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:2")
    assert S3Store("s3://b/p").endpoint_url == "http://generic:2"


# --------------------------------------------------------------------------------------------- round trips
def test_file_roundtrip(store, tmp_path):
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(1_000_003))
    assert not store.exists("stage/a/data.bin")
    put = store.put_file(src, "stage/a/data.bin")
    assert put.kind == "file" and put.size_bytes == 1_000_003
    assert put.sha256 == sha256_file(src)
    assert put.uri == store.uri("stage/a/data.bin")
    assert store.exists("stage/a/data.bin") and not store.is_dir("stage/a/data.bin")
    out = store.get_file("stage/a/data.bin", tmp_path / "out" / "copy.bin")
    assert out.read_bytes() == src.read_bytes()
    assert store.read_bytes("stage/a/data.bin") == src.read_bytes()
    assert store.stat("stage/a/data.bin")["size"] == 1_000_003
    assert store.compute_sha256("stage/a/data.bin") == (put.sha256, 1_000_003)
    with pytest.raises(ArtifactMissing):
        store.get_file("stage/a/nope.bin", tmp_path / "nope")
    with pytest.raises(ArtifactMissing):
        store.read_bytes("stage/a/nope.bin")


def test_write_bytes_overwrites(store):
    r1 = store.write_bytes("m/x.json", b'{"v": 1}')
    r2 = store.write_bytes("m/x.json", b'{"v": 22}')
    assert r1.sha256 != r2.sha256
    assert store.read_bytes("m/x.json") == b'{"v": 22}'
    assert store.list_keys("m") == ["m/x.json"]


def test_dir_roundtrip(store, tmp_path):
    src = _make_tree(tmp_path / "ckpt")
    put = store.put_dir(src, "ckpt/abc")
    assert put.kind == "dir" and put.files == 4
    assert put.sha256 == hash_dir(src).sha256
    assert put.size_bytes == sum(len(b) for b in _read_tree(src).values())
    assert store.exists("ckpt/abc") and store.is_dir("ckpt/abc")
    assert f"ckpt/abc/{COMPLETE_MARKER}" in store.list_keys("ckpt/abc")
    out = store.get_dir("ckpt/abc", tmp_path / "back")
    assert _read_tree(out) == _read_tree(src)  # identical bytes, marker not copied
    assert store.compute_sha256("ckpt/abc") == (put.sha256, put.size_bytes)
    # a prefix sharing the first letters is another artifact
    assert not store.exists("ckpt/ab")


def test_dir_overwrite_drops_stale_files(store, tmp_path):
    src = _make_tree(tmp_path / "v1")
    store.put_dir(src, "d")
    (src / "sub" / "x.bin").unlink()
    (src / "new.txt").write_text("new")
    put = store.put_dir(src, "d")
    out = store.get_dir("d", tmp_path / "back")
    assert _read_tree(out) == _read_tree(src)
    assert put.sha256 == hash_dir(src).sha256
    assert not any(k.endswith("x.bin") for k in store.list_keys("d"))


def test_get_dir_into_existing_folder_replaces_it(store, tmp_path):
    src = _make_tree(tmp_path / "src")
    store.put_dir(src, "d")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    store.get_dir("d", dst)
    assert _read_tree(dst) == _read_tree(src)


def test_delete_prefix(store, tmp_path):
    src = _make_tree(tmp_path / "src")
    store.put_dir(src, "s/abc")
    store.write_bytes("s/abcdef", b"sibling")
    store.write_bytes("s/abc.manifest.json", b"{}")
    assert store.delete_prefix("s/abc") == 5
    assert not store.exists("s/abc")
    assert store.read_bytes("s/abcdef") == b"sibling"
    assert store.exists("s/abc.manifest.json")
    assert store.delete_prefix("s/missing") == 0


# --------------------------------------------------------------------------------------------- atomicity
def test_prefix_without_marker_is_absent(store, tmp_path):
    """A half-written directory (objects, no _COMPLETE) reads as absent."""
    _raw_put(store, "half/config.json", b"{}")
    _raw_put(store, "half/model.safetensors", b"x" * 100)
    assert not store.exists("half")
    assert not store.is_dir("half")
    assert store.dir_listing("half") is None
    with pytest.raises(ArtifactMissing):
        store.get_dir("half", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _fail_third_call(monkeypatch, owner, name: str, error: Exception, partial: bool = False) -> None:
    """Make ``owner.name`` raise ``error`` on its third call (after writing b"partial" to its output)."""
    calls = {"n": 0}
    real = getattr(owner, name)

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            if partial:
                args[1].write(b"partial")
            raise error
        return real(*args)

    monkeypatch.setattr(owner, name, flaky)


def _assert_crash_left_nothing(store, src) -> None:
    with pytest.raises((OSError, StorageError, ConnectionError)):
        store.put_dir(src, "crash/d")
    assert not store.exists("crash/d")
    assert store.list_keys("crash") == []  # what the failed write had written is gone
    if isinstance(store, LocalStore):  # no temp debris either
        assert [p.name for p in (store.root / "crash").iterdir()] == []


def test_crash_during_put_dir_leaves_no_complete_artifact(store, tmp_path, monkeypatch):
    """The third object fails to upload / write."""
    _fail_third_call(monkeypatch, store, "_put_one", ConnectionError("network down (simulated)"))
    _assert_crash_left_nothing(store, _make_tree(tmp_path / "src"))


def test_local_disk_full_mid_file_leaves_no_temp(tmp_path, monkeypatch):
    """The disk fills up in the middle of the third file (S3 objects are uploaded whole)."""
    _fail_third_call(monkeypatch, digests, "copy_hashing", OSError("disk full (simulated)"), partial=True)
    _assert_crash_left_nothing(LocalStore(tmp_path / "store"), _make_tree(tmp_path / "src"))


def test_local_put_file_is_atomic(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    store.write_bytes("k/v.bin", b"old content")
    src = tmp_path / "new.bin"
    src.write_bytes(b"new content" * 1000)

    def broken(fin, fout):
        fout.write(b"half")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(digests, "copy_hashing", broken)
    with pytest.raises(OSError):
        store.put_file(src, "k/v.bin")
    assert store.read_bytes("k/v.bin") == b"old content"  # old version intact
    assert sorted(p.name for p in (store.root / "k").iterdir()) == ["v.bin"]  # no temp file left


def test_rewrite_retracts_marker_first(store, tmp_path, monkeypatch):
    """While a directory artifact is being rewritten, readers see it as absent (not old+new mixed)."""
    src = _make_tree(tmp_path / "src")
    store.put_dir(src, "d")
    seen = []
    real = store._put_one

    def spy(src, path):
        seen.append(store.exists("d"))
        return real(src, path)

    monkeypatch.setattr(store, "_put_one", spy)
    store.put_dir(src, "d")
    assert seen and not any(seen)
    assert store.exists("d")


# --------------------------------------------------------------------------------------------- integrity
def test_get_dir_detects_corruption(store, tmp_path):
    src = _make_tree(tmp_path / "src")
    store.put_dir(src, "c")
    _raw_put(store, "c/sub/x.bin", b"\x01" * 1000)  # same size, other bytes
    with pytest.raises(CorruptArtifact):
        store.get_dir("c", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    out = store.get_dir("c", tmp_path / "out2", verify=False)
    assert (out / "sub" / "x.bin").read_bytes() == b"\x01" * 1000


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_manifest_verify_detects_corruption(store, tmp_path, kind, caplog):
    if kind == "file":
        src = tmp_path / "stat.json"
        src.write_bytes(b'{"S": [1.0, 2.0, 3.0]}')
        put = store.put_file(src, "stats/k1/stat.json")
        victim, bad = "stats/k1/stat.json", b'{"S": [1.0, 2.0, 9.0]}'
    else:
        src = _make_tree(tmp_path / "ckpt")
        put = store.put_dir(src, "stats/k1")
        victim, bad = "stats/k1/sub/x.bin", b"\x07" * 1000
    m = Manifest.from_put("statistic", put, cache_key="k1", figures={"blocks": 3})
    mkey = manifest_key(put.key)
    write_manifest(store, mkey, m)

    back = read_manifest(store, mkey)
    assert back == m
    assert verify(store, back, deep=True)
    assert verify(store, back)  # default depth
    assert load_verified(store, mkey, cache_key="k1") == m
    with caplog.at_level(logging.WARNING):
        assert load_verified(store, mkey, cache_key="other") is None

    _raw_put(store, victim, bad)
    with caplog.at_level(logging.WARNING):
        assert not verify(store, back, deep=True)
        assert load_verified(store, mkey, deep=True) is None
    assert "recompute" in caplog.text


def test_manifest_verify_missing_artifact(store, tmp_path, caplog):
    put = store.write_bytes("ppl/k2/result.json", b'{"ppl": 22.8}')
    m = Manifest.from_put("perplexity", put, cache_key="k2", figures={"ppl": 22.8})
    write_manifest(store, manifest_key(put.key), m)
    store.delete_prefix("ppl/k2/result.json")
    with caplog.at_level(logging.WARNING):
        assert load_verified(store, manifest_key(put.key)) is None
    assert "missing" in caplog.text


def test_manifest_json_roundtrip():
    m = Manifest(stage="prune", key="a/b", uri="s3://x/a/b", kind="dir", sha256="0" * 64, size_bytes=10,
                 files=2, figures={"sparsity": [0.6, 0.8]}, cache_key="ck")
    again = Manifest.from_json(m.to_json())
    assert again == m and again.created.endswith("+00:00")
    assert Manifest.from_json(m.to_json().replace('"format": 1', '"format": 1, "future_field": 3')) == m


def test_unreadable_manifest_is_ignored(store, caplog):
    store.write_bytes("x.manifest.json", b"not json")
    with caplog.at_level(logging.WARNING):
        assert read_manifest(store, "x.manifest.json") is None
    assert read_manifest(store, "absent.manifest.json") is None


# --------------------------------------------------------------------------------------------- preflight
def test_preflight_s3_ok(s3_bucket):
    assert s3_bucket.name in check_s3(s3_bucket.prefix_uri("p"), endpoint_url=s3_bucket.endpoint_url)


def test_preflight_s3_missing_bucket(s3_bucket):
    with pytest.raises(PreflightError, match="does not exist"):
        check_s3("s3://no-such-bucket-here/p", endpoint_url=s3_bucket.endpoint_url)


def test_preflight_s3_unreachable_endpoint_is_quick(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    t = time.monotonic()
    with pytest.raises(PreflightError) as e:
        check_s3("s3://bucket/prefix", endpoint_url="http://127.0.0.1:9", timeout=2)
    assert time.monotonic() - t < 5
    msg = str(e.value)
    assert "\n" not in msg and "http://127.0.0.1:9" in msg and "storage.endpoint_url" in msg


def test_preflight_s3_env_endpoint_named(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    with pytest.raises(PreflightError, match="AWS_ENDPOINT_URL_S3"):
        check_s3("s3://bucket/prefix", timeout=2)


def test_shallow_verify_catches_missing_and_resized_files(store, tmp_path, caplog):
    src = _make_tree(tmp_path / "src")
    put = store.put_dir(src, "v/d")
    m = Manifest.from_put("prune", put)
    assert verify(store, m, deep=False)
    _raw_put(store, "v/d/sub/x.bin", b"\x00" * 999)  # resized
    with caplog.at_level(logging.WARNING):
        assert not verify(store, m, deep=False)
    assert "size changed: sub/x.bin" in caplog.text
    store.put_dir(src, "v/d")
    store.fs.rm_file(store.path("v/d/config.json"))
    with caplog.at_level(logging.WARNING):
        assert not verify(store, m, deep=False)
    assert "missing: config.json" in caplog.text


def test_preflight_for_a_job_on_s3(s3_bucket, tmp_path, monkeypatch):
    from pipeline.jobconfig import load_job
    from pipeline.preflight import run_preflight

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = load_job(None, {"workdir": str(tmp_path / "w"), "storage.uri": s3_bucket.prefix_uri("art"),
                          "storage.endpoint_url": s3_bucket.endpoint_url})
    lines = run_preflight(job)
    assert any(s3_bucket.name in line for line in lines)
    job = load_job(None, {"workdir": str(tmp_path / "w"), "storage.uri": "s3://absent-bucket/art",
                          "storage.endpoint_url": s3_bucket.endpoint_url})
    with pytest.raises(PreflightError, match="absent-bucket"):
        run_preflight(job)


def test_s3_listings_see_another_writer(s3_bucket):
    """s3fs caches listings by default; the store must see objects another process wrote since its last look."""
    store = S3Store(s3_bucket.prefix_uri("shared"), endpoint_url=s3_bucket.endpoint_url)
    assert store.list_keys("x") == [] and not store.exists("x/a.json")
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="shared/x/a.json", Body=b"{}")  # another writer
    assert store.list_keys("x") == ["x/a.json"] and store.exists("x/a.json")
    assert store.dir_sizes("x") == {"a.json": 2}
    s3_bucket.client.delete_object(Bucket=s3_bucket.name, Key="shared/x/a.json")
    assert store.list_keys("x") == [] and not store.exists("x/a.json")


def test_s3_failure_is_a_storage_error(monkeypatch):
    """Any S3 failure but a missing key is a StorageError (the stages retry those), in one line."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    store = S3Store("s3://bucket/p", endpoint_url="http://127.0.0.1:9")
    monkeypatch.setattr(store.fs, "retries", 1)  # no retries: fail fast
    with pytest.raises(StorageError) as e:
        store.write_bytes("k.json", b"{}")
    assert not isinstance(e.value, ArtifactMissing)
    assert "\n" not in str(e.value) and "s3://bucket/p/k.json" in str(e.value) and "127.0.0.1:9" in str(e.value)
