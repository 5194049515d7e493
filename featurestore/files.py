"""Local files that are written whole or not at all.

A reader — another process, a rerun after a crash — sees either the old file or the new one,
never half of one: the data goes to a hidden temporary file beside the target
(``.<name>.<pid>.<random>.tmp``, same directory so the rename stays on one file system), is
flushed to disk, then renamed over the target. On failure the temporary file is removed.
Concurrent writers of the same path do not collide; the last rename wins.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace the file at ``path`` with ``data`` atomically. The parent directory must exist.

    The new file gets the usual permissions for this process (``0o666`` less the umask)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """:func:`atomic_write_bytes` of ``text`` in ``encoding``."""
    atomic_write_bytes(path, text.encode(encoding))
