"""Release sources for the ``watch-releases`` flow: where a watched model's newest revision comes from.

Two sources, one interface (:class:`ReleaseSource.latest` -> :class:`Release` or None):

- :class:`HubSource` -- a Hugging Face hub repo; the latest release is the commit sha the repo's branch
  (default ``main``) points at now: ``HfApi().model_info(repo, revision=branch).sha``. The compression job then
  runs on ``model.source = repo`` pinned to ``model.revision = sha``.
- :class:`LocalFolderSource` -- a folder whose sub-folders are model snapshots (Hugging Face folders with a
  ``config.json``). A snapshot's revision is the first line of its ``revision.txt`` when present, else the
  sub-folder name. The latest snapshot is the newest by modification time (``order: mtime``, the default;
  ties broken by name) or the last by name (``order: name``, for date-stamped names such as
  ``2025-06-01-ab12cd``). Hidden (``.``-prefixed) and ``_``-prefixed folders are ignored, and so are folders
  without ``config.json``: copy a snapshot in under a hidden name and rename it when complete.

:func:`make_source` builds a source from one ``configs/watch.yaml`` entry (``{"hub": "org/name"}`` or
``{"local": "/path"}``). No heavy imports here; ``huggingface_hub`` is imported only when the hub is asked.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Protocol

__all__ = [
    "HubSource",
    "LocalFolderSource",
    "Release",
    "ReleaseError",
    "ReleaseSource",
    "make_source",
]

REVISION_FILE = "revision.txt"


class ReleaseError(ValueError):
    """A release source that cannot be read or is misconfigured (one-line message)."""


@dataclass(frozen=True)
class Release:
    """One model release: ``source`` and ``revision`` are what the compression job gets as
    ``model.source`` / ``model.revision``."""

    kind: Literal["hub", "local"]
    source: str  # hub repo id, or the snapshot folder (absolute path)
    revision: str  # hub commit sha, or the snapshot's revision
    origin: str  # the watched thing: repo id, or the folder holding the snapshots
    modified: float | None = None  # snapshot mtime (local) or hub last-modified timestamp, when known
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ReleaseSource(Protocol):
    def latest(self) -> Release | None:  # pragma: no cover - protocol
        ...

    def describe(self) -> str:  # pragma: no cover - protocol
        ...


# ============================================================================================ hub
class HubSource:
    """The current commit of a hub repo's branch. ``api`` (an object with ``model_info(repo_id, revision=...)``)
    can be injected for tests; by default ``huggingface_hub.HfApi(token=token)``."""

    def __init__(self, repo_id: str, revision: str = "main", *, token: str | None = None, api: Any = None):
        if not repo_id or "/" not in repo_id:
            raise ReleaseError(f"hub source {repo_id!r}: expected a repo id such as 'org/name'")
        self.repo_id = repo_id
        self.branch = revision or "main"
        self.token = token
        self._api = api

    def describe(self) -> str:
        return f"hub:{self.repo_id}@{self.branch}"

    def latest(self) -> Release | None:
        api = self._api
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=self.token)
        try:
            info = api.model_info(self.repo_id, revision=self.branch)
        except Exception as e:  # network, auth, missing repo: one line
            raise ReleaseError(f"hub repo {self.repo_id}@{self.branch}: cannot read model info ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from e
        sha = getattr(info, "sha", None)
        if not sha:
            raise ReleaseError(f"hub repo {self.repo_id}@{self.branch}: the hub returned no commit sha")
        modified = getattr(info, "last_modified", None) or getattr(info, "lastModified", None)
        ts = modified.timestamp() if hasattr(modified, "timestamp") else None
        return Release(kind="hub", source=self.repo_id, revision=str(sha), origin=self.repo_id, modified=ts,
                       extra={"branch": self.branch})


# ============================================================================================ local
class LocalFolderSource:
    """Sub-folders of ``root`` are snapshots; see the module docstring for revision and ordering rules."""

    def __init__(self, root: str | os.PathLike[str], *, order: Literal["mtime", "name"] = "mtime"):
        if order not in ("mtime", "name"):
            raise ReleaseError(f"local source {root}: order must be 'mtime' or 'name', got {order!r}")
        self.root = Path(root).expanduser()
        self.order = order

    def describe(self) -> str:
        return f"local:{self.root}"

    @staticmethod
    def revision_of(folder: Path) -> str:
        rev_file = folder / REVISION_FILE
        if rev_file.is_file():
            lines = [ln.strip() for ln in rev_file.read_text(encoding="utf-8", errors="replace").splitlines()]
            rev = next((ln for ln in lines if ln and not ln.startswith("#")), "")
            if rev:
                return rev
        return folder.name

    def snapshots(self) -> list[Path]:
        """Complete snapshot folders, oldest first (by the configured order)."""
        if not self.root.is_dir():
            raise ReleaseError(f"local release folder {self.root} does not exist")
        found = [
            p for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith((".", "_")) and (p / "config.json").is_file()
        ]
        if self.order == "name":
            return sorted(found, key=lambda p: p.name)
        return sorted(found, key=lambda p: (_snapshot_mtime(p), p.name))

    def latest(self) -> Release | None:
        snaps = self.snapshots()
        if not snaps:
            return None
        newest = snaps[-1]
        return Release(kind="local", source=str(newest.resolve()), revision=self.revision_of(newest),
                       origin=str(self.root.resolve()), modified=_snapshot_mtime(newest),
                       extra={"snapshot": newest.name})


def _snapshot_mtime(folder: Path) -> float:
    """Newest mtime of the folder and its top-level files (a rename or a late file write both count)."""
    times = [folder.stat().st_mtime]
    for p in folder.iterdir():
        try:
            times.append(p.stat().st_mtime)
        except OSError:  # removed meanwhile
            pass
    return max(times)


# ============================================================================================ factory
def make_source(spec: Mapping[str, Any], *, hub_api_factory: Callable[[], Any] | None = None) -> ReleaseSource:
    """A source from a watch entry's ``source`` mapping: ``{"hub": "org/name", "revision": "main"}`` or
    ``{"local": "/path/to/snapshots", "order": "mtime"}``."""
    if not isinstance(spec, Mapping):
        raise ReleaseError(f"release source must be a mapping with 'hub' or 'local', got {spec!r}")
    keys = set(spec)
    if "hub" in spec and "local" in spec:
        raise ReleaseError("release source: give either 'hub' or 'local', not both")
    if "hub" in spec:
        unknown = keys - {"hub", "revision", "token_env"}
        if unknown:
            raise ReleaseError(f"hub release source: unknown key(s) {', '.join(sorted(unknown))} (valid: hub, revision, token_env)")
        token = os.environ.get(spec["token_env"]) if spec.get("token_env") else None
        api = hub_api_factory() if hub_api_factory else None
        return HubSource(str(spec["hub"]), str(spec.get("revision") or "main"), token=token, api=api)
    if "local" in spec:
        unknown = keys - {"local", "order"}
        if unknown:
            raise ReleaseError(f"local release source: unknown key(s) {', '.join(sorted(unknown))} (valid: local, order)")
        return LocalFolderSource(str(spec["local"]), order=spec.get("order", "mtime"))
    raise ReleaseError(f"release source needs 'hub: org/name' or 'local: /folder', got keys {sorted(keys)}")
