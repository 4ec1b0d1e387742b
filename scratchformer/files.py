"""Writing files so that nothing is lost: a crash leaves the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_args):
    """Yield a file object to write `path`'s new contents to. They go to a temporary file in the
    same folder, which is synced and renamed over `path` when the block ends, and removed if the
    block raises. The file gets the permissions a plain open() would give it (0666 less the
    umask), not the 0600 of a temporary file."""
    path = Path(path)
    f = tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False, **open_args)
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(f.name, 0o666 & ~_umask())
        os.replace(f.name, path)
    finally:
        if os.path.exists(f.name):
            os.unlink(f.name)
