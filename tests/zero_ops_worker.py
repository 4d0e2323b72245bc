"""Run by tests/test_bench_model_deepspeed.py on two CPU ranks: the real Trainer (ZeRO-2, bf16,
optim.fused_clip) takes one step under bench.model's tracer; each rank prints one JSON line with the
bytes of the collectives and of the optimizer's passes it ran, for the ZeRO projection's assumptions."""
from __future__ import annotations

import argparse
import json

from engine.config import from_dict
from tests.engine.trainer_fixtures import tiny_config
from tests.test_bench_model_deepspeed import COLLECTIVES, traced_step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()
    from engine.trainer import Trainer

    raw = tiny_config(f"{args.dir}/run", f"{args.dir}/data",
                      train={"precision": "bf16", "global_batch_size": 8, "max_steps": 2}, optim={"fused_clip": "true"})
    trainer = Trainer(from_dict(raw))
    try:
        ops = [op for op in traced_step(trainer) if op.fused_region or op.name in COLLECTIVES]
        sums = {}
        for op in ops:
            key = f"{op.step_phase} {op.name}"
            sums[key] = [a + b for a, b in zip(sums.get(key, [0, 0]), [op.read, op.written])]
        params = sum(p.numel() for p in trainer.engine.module.parameters() if p.requires_grad)
        print("RESULT " + json.dumps({"rank": trainer.rank, "world": trainer.world_size, "params": params,
                                      "accum": trainer.accum, "bytes": sums}), flush=True)
    finally:
        trainer.engine.destroy()


if __name__ == "__main__":
    main()
