"""The local place of the artifact store: a folder on this machine, through fsspec's local filesystem.

Everything but how one object is written is :class:`pipeline.store.ArtifactStore`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from pipeline import digests
from pipeline.store import ArtifactStore, StorageError, normalize_key, tmp_sibling

__all__ = ["LocalStore"]


class LocalStore(ArtifactStore):
    """A folder on local disk (fsspec's local filesystem)."""

    remote = False

    def __init__(self, root: str | os.PathLike[str]):
        from fsspec.implementations.local import LocalFileSystem

        self.root = Path(root).expanduser().resolve()
        super().__init__(LocalFileSystem(auto_mkdir=True), self.root.as_posix(), self.root.as_uri())

    def uri(self, key: str) -> str:
        return (self.root / normalize_key(key)).as_uri()

    def local_path(self, key: str) -> Path | None:
        return self.root / normalize_key(key)

    def _put_one(self, src: Path | bytes, path: str) -> tuple[str, int]:
        """Copy to a temp name in the target's folder, hashing, then rename over the target."""
        if os.path.isdir(path):
            raise StorageError(f"cannot write file {Path(path).as_uri()}: a directory artifact is there")
        tmp = tmp_sibling(Path(path))
        try:
            with (io.BytesIO(src) if isinstance(src, bytes) else open(src, "rb")) as fin, self.fs.open(str(tmp), "wb") as fout:
                got = digests.copy_hashing(fin, fout)
                fout.flush()
                os.fsync(fout.fileno())
            self.fs.mv(str(tmp), path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return got
