"""Writing a file whole: readers see the old file or the new one, never a partial one (checkpoints,
parts, sample files, data indexes and caches all write through `write_atomic`)."""
from __future__ import annotations

import os


def write_atomic(path: str, write) -> str:
    """write(file) into a temporary file beside `path` (opened "wb"; `<path>.tmp-<pid>`, removed if
    `write` raises), fsynced, then renamed to `path` and the rename made durable: readers see the old
    file or the whole new one, never a partial one, also after a crash of the machine."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # the rename itself, durable
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path
