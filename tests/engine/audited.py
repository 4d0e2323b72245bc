"""`python -m tests.engine.audited MODULE ARGS...`: run `python -m MODULE ARGS...` while recording every
file this process opens for writing, renames or creates a directory as, under $ALIGNFLOW_AUDIT_ROOT;
the list goes to $ALIGNFLOW_AUDIT_DIR/rank<RANK>.json at exit. The multi-node tests use it to check
which rank writes what into the shared run directory (files written by C++, such as DeepSpeed's
torch.save shards, are not seen: their per-rank names show who wrote them). With
$ALIGNFLOW_TEST_STEP_DELAY_S set, each training step is followed by that much sleep (a run long
enough to kill a node mid-way; the numbers are unchanged)."""
from __future__ import annotations

import atexit
import json
import os
import runpy
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


def main() -> None:
    root = os.path.realpath(os.environ["ALIGNFLOW_AUDIT_ROOT"])
    out_dir = os.environ["ALIGNFLOW_AUDIT_DIR"]
    written: set[str] = set()

    def note(path) -> None:
        if isinstance(path, (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(path))
            if path.startswith(root + os.sep):
                written.add(os.path.relpath(path, root))

    def hook(event: str, args) -> None:
        if event == "open" and len(args) >= 3:
            path, mode, flags = args[0], args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or (not mode and (flags or 0) & WRITE_FLAGS):
                note(path)
        elif event == "os.rename":
            note(args[1])
        elif event == "os.mkdir":
            note(args[0])

    def dump() -> None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
            json.dump(sorted(written), f)

    delay = float(os.environ.get("ALIGNFLOW_TEST_STEP_DELAY_S", "0"))
    if delay > 0:
        import time

        from engine.trainer import Trainer

        step = Trainer.train_step

        def slow_step(self, *args, **kwargs):
            out = step(self, *args, **kwargs)
            time.sleep(delay)
            return out

        Trainer.train_step = slow_step
    atexit.register(dump)
    sys.addaudithook(hook)
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher's; LOCAL_RANK has it
    module, sys.argv = args[0], args
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
