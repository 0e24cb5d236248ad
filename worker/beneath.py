"""Open a local file beneath an allowed root with no symlink in any path component, without
blocking, and only if it is a regular file.

``confine()`` resolved the path when the ref was parsed, but any component can be swapped for a
symlink between that check and the open. ``O_NOFOLLOW`` alone guards only the last component, so
the path is walked from the root one directory fd at a time, each component opened with
``O_NOFOLLOW`` (``O_DIRECTORY`` for folders): a symlink anywhere fails the open instead of being
followed. ``O_NONBLOCK`` keeps a FIFO from blocking the open; ``fstat`` on the opened fd then
decides what it is, so nothing can change between the check and the read.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from imgq import errors

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_beneath(path: Path, roots: list[Path]) -> int:
    """A read-only fd of the regular file at ``path`` (absolute, inside one of ``roots``)."""
    root = next((r for r in roots if path == r or path.is_relative_to(r)), None)
    if root is None or path == root:
        raise errors.BadRef(f"{path} is outside IMGQ_LOCAL_ROOTS")
    parts = path.relative_to(root).parts
    if ".." in parts:  # is_relative_to is lexical: root/../x would walk out of the root
        raise errors.BadRef(f"{path} is outside IMGQ_LOCAL_ROOTS")
    fd = os.open(root, _DIR)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                nxt = os.open(part, _FILE if last else _DIR, dir_fd=fd)
            except OSError as exc:
                raise _refusal(exc, path, part) from None
            os.close(fd)
            fd = nxt
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "not a regular file"
            raise errors.NotAFile(f"{path} is {kind}")
        opened, fd = fd, -1
        os.set_blocking(opened, True)
        return opened
    finally:
        if fd >= 0:
            os.close(fd)


def _refusal(exc: OSError, path: Path, part: str) -> Exception:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return errors.BadRef(f"{path}: {part!r} is a symlink or not a folder (checked at open)")
    if exc.errno == errno.ENXIO:  # a Unix socket
        return errors.NotAFile(f"{path} is a socket")
    return exc  # ENOENT, EACCES, ...: classified by the caller
