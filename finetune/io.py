"""Atomic file writes: a reader sees the old file or the whole new one, never half of it.

Every writer goes through `atomic_open`: the data lands in a temp file in the target's own folder
(so the final rename never crosses a filesystem), is flushed and fsynced, made 0644 (mkstemp
creates 0600, and run outputs are meant to be shared), then renamed over the target with
`os.replace`, the one step POSIX makes atomic. On any error the temp file is removed and the old
file, if there was one, is left untouched.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text"]


@contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Binary file handle whose content replaces `path` only when the block exits without error.

    For writers that want a handle rather than bytes (``fig.savefig(fh, format="png")``)::

        with atomic_open(out / "results.png") as fh:
            fig.savefig(fh, format="png")

    The folder holding `path` must exist.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        # BaseException too: a KeyboardInterrupt mid-write must not leave a stray temp file.
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace `path` with `data` atomically (see the module docstring)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes needs bytes for {path}, got {type(data).__name__}")
    with atomic_open(path) as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Replace `path` with `text` encoded as UTF-8, atomically (see the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text needs a str for {path}, got {type(text).__name__}")
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable: it lives in the folder's entry table, not in the file."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # folders cannot be opened on some platforms (Windows); the rename still happened
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the data itself is already synced
    finally:
        os.close(fd)
