"""Writing a file whole: readers see the old file or the new one, never a partial one."""
from __future__ import annotations

import os


def write_atomic(path: str, write) -> str:
    """write(file) into a temporary file beside `path`, then rename it to `path`: readers see the old
    file or the whole new one, never a partial one."""
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
    return path
