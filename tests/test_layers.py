"""The layers point one way: cli -> flows -> tasks -> pipeline, dlp. Every import counts, also the ones
inside functions (they run sooner or later), so the walk reads the source, not ``sys.modules``."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: package -> top-level modules it must never import
FORBIDDEN = {
    "dlp": {"prefect", "prefect_aws", "prefect_dask", "mlflow", "boto3", "botocore", "s3fs", "pipeline", "tasks",
            "flows", "cli", "deployments"},
    "pipeline": {"tasks", "flows", "cli", "deployments"},
    "tasks": {"flows", "cli", "deployments"},
    "flows": {"cli", "deployments"},
}


def imported_tops(path: Path) -> set[tuple[str, int]]:
    """(top-level module, line) for every absolute import in the file; relative imports stay inside it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update((alias.name.split(".")[0], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


def violations(package: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for top, line in imported_tops(path):
            if top in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {top}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_downwards(package):
    assert (ROOT / package).is_dir()
    assert violations(package) == []


def test_walk_catches_an_upward_import(tmp_path, monkeypatch):
    """The check itself: a function-level ``import prefect`` in dlp/ is reported."""
    fake = tmp_path / "dlp"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    from prefect import task\n    import torch\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations("dlp") == ["dlp/bad.py:2 imports prefect"]
