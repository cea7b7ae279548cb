"""Writing files so that a kill or a power cut at any instant leaves the old file or the new one, never half of one.

The one atomic-write helper of the project: the exporter, the registry and the edge agent all write through it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"


def atomic_write(path: Path, data: bytes | str, *, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path``: a temporary file in the same folder, fsync, rename over ``path``, fsync the folder.

    ``mode`` is set before any byte is written, so a secret (``0o600``) is never readable by others, even briefly.
    The temporary file is named ``.<name>.<random>.tmp``; one left by a kill is ignored by readers of ``path``.
    """
    payload = data.encode() if isinstance(data, str) else data
    with atomic_output(path, mode=mode) as temporary, temporary.open("wb") as handle:
        handle.write(payload)
    return path


@contextlib.contextmanager
def atomic_output(path: Path, *, mode: int = 0o644) -> Iterator[Path]:
    """A temporary file beside ``path`` for a writer that fills it itself (a library's ``save(filename)``); on
    leaving the block it replaces ``path`` (``commit_file``), and on an error it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    temporary = Path(name)
    try:
        os.fchmod(fd, mode)
        os.close(fd)
        yield temporary
        commit_file(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise


def commit_file(temporary: Path, path: Path) -> Path:
    """Put a fully written ``temporary`` file in place of ``path``: fsync it, rename it, fsync the folder.

    The last step of ``atomic_write``, and of writers that fill the temporary file themselves (a resumable
    download's ``.part`` file). ``temporary`` must be in ``path``'s folder, so that the rename is atomic.
    """
    with temporary.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_dir(path.parent)
    return path


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in ``directory`` durable (the file's own fsync does not cover its name)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def leftover_temporaries(path: Path) -> list[Path]:
    """Temporary files that an interrupted ``atomic_write(path, ...)`` may have left beside ``path``."""
    return sorted(path.parent.glob(f".{path.name}.*{TEMPORARY_SUFFIX}"))
