"""Run under the deepspeed launcher by tests/engine/test_optim_distributed.py (two CPU ranks): for each
`--runs stage:precision[:copies]` (copies: train.bf16_weight_copies true), the same fixed-seed run with optim.fused_clip false (DeepSpeed clips) and
true (the clip inside the fused AdamW step), or with `--compare step_kernel` both with fused_clip true
and optim.step_kernel torch and alignflow; rank 0 writes both runs' losses, logged gradient norms and
the largest difference of their gathered fp32 master weights to --out."""
from __future__ import annotations

import argparse
import dataclasses

import torch

from tests.engine.worker_results import write_on_rank0


def one_run(cfg, steps: int) -> dict:
    from engine.trainer import Trainer
    from kernels import _cuda
    from tests.engine.dist_worker import full_master_weights

    trainer = Trainer(cfg)
    try:
        before = _cuda.launches["adamw_step"]
        metrics = [trainer.train_step() for _ in range(steps)]
        launches = _cuda.launches["adamw_step"] - before
        masters = full_master_weights(trainer)
        copies = trainer.weight_copies.mapping() if trainer.weight_copies is not None else {}
        copies_equal = all(torch.equal(c, p.detach().to(c.dtype)) for p, c in copies.items())
        return dict(launches=launches, copies=len(copies), copies_equal=copies_equal,
                    copies_by_optimizer=trainer.copies_written_by_optimizer, losses=[m["loss"] for m in metrics], grad_norms=[m["grad_norm"] for m in metrics],
                    masters=masters, fused_clip=trainer.fused_clip,
                    step_kernel=getattr(trainer.clip_optimizer, "step_kernel", None), zero_stage=trainer.engine.zero_optimization_stage(),
                    precision=trainer.precision, moved=max(float((masters[k] - trainer.initial_state[k]).abs().max())
                                                           for k in masters))
    finally:
        trainer.engine.destroy()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--zero3-json", required=True)
    parser.add_argument("--runs", required=True, help="comma-separated stage:precision")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    parser.add_argument("--compare", choices=["fused_clip", "step_kernel"], default="fused_clip")
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    from deepspeed.runtime import torch_autocast

    from engine.config import load_config

    base = load_config(args.config)
    results = {}
    import time
    for run in args.runs.split(","):
        stage, precision, *copies = run.split(":")
        pair = {}
        settings = [dict(fused_clip="false"), dict(fused_clip="true")] if args.compare == "fused_clip" else \
            [dict(fused_clip="true", step_kernel="torch"), dict(fused_clip="true", step_kernel="alignflow")]
        for i, setting in enumerate(settings):
            value = setting[args.compare]
            torch_autocast.TORCH_AUTOCAST_INITIALIZED, torch_autocast.TORCH_AUTOCAST_DTYPE = False, None
            train = dataclasses.replace(base.train, zero_stage=int(stage), precision=precision,
                                        bf16_weight_copies="true" if copies == ["copies"] else "false",
                                        output_dir=f"{base.train.output_dir}/{run.replace(':', '-')}-{value}",
                                        deepspeed_config=args.zero3_json if stage == "3" else base.train.deepspeed_config)
            cfg = dataclasses.replace(base, train=train, optim=dataclasses.replace(base.optim, **setting))
            started = time.time()
            pair[i] = one_run(cfg, args.steps)
            print(f"{run} {args.compare}={value}: {time.time() - started:.1f} s", flush=True)
        a, b = pair[0], pair[1]
        results[run] = dict(launches=[a["launches"], b["launches"]], step_kernel=[a["step_kernel"], b["step_kernel"]],
            copies=[a["copies"], b["copies"]], copies_equal=[a["copies_equal"], b["copies_equal"]],
            copies_by_optimizer=[a["copies_by_optimizer"], b["copies_by_optimizer"]],
            fused_clip=[a["fused_clip"], b["fused_clip"]], zero_stage=b["zero_stage"], precision=b["precision"],
            losses=[a["losses"], b["losses"]], grad_norms=[a["grad_norms"], b["grad_norms"]], moved=b["moved"],
            master_max_diff=max(float((a["masters"][k] - b["masters"][k]).abs().max()) for k in a["masters"]))
    write_on_rank0(args.out, results)


if __name__ == "__main__":
    main()
