"""Atomic file writes: a reader never sees half a file, a crash never leaves one.

Write to a hidden temporary file in the same folder, flush and fsync it, then
``os.replace`` it over the target (atomic on POSIX). On any error the temporary
file is removed and the target is untouched.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

TMP_SUFFIX = ".tmp"


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_open(path, "w") as f: f.write(...)`` replaces ``path`` on success.

    The temporary name is ``.<name>.<random><TMP_SUFFIX>``, so folder owners can
    recognise (and clean) leftovers of a crash by ``TMP_SUFFIX``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
