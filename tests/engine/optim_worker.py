"""Run under the deepspeed launcher by tests/engine/test_optim_distributed.py (two CPU ranks): for each
`--runs stage:precision[:copies]` (copies: train.bf16_weight_copies true), the same fixed-seed run with optim.fused_clip false (DeepSpeed clips) and
true (the clip inside the fused AdamW step), or with `--compare step_kernel` both with fused_clip true
and optim.step_kernel torch and alignflow, or with `--compare overflow_check` both with fused_clip true and
bf16.check_grad_overflow true in the DeepSpeed JSON (DeepSpeed's check) and as generated (off: ClippedAdamW
skips), a NaN put into one gradient at step `--nan-step`; rank 0 writes both runs' losses, logged gradient norms and
the largest difference of their gathered fp32 master weights to --out."""
from __future__ import annotations

import argparse
import dataclasses

import torch

from tests.engine.worker_results import write_on_rank0


def one_run(cfg, steps: int, nan_step: int | None = None) -> dict:
    from engine.trainer import Trainer
    from kernels import _cuda
    from tests.engine.dist_worker import full_master_weights

    trainer = Trainer(cfg)
    try:
        if nan_step is not None:  # a finite loss, a NaN in one gradient (every rank: the reduction spreads it anyway)
            param = next(p for p in trainer.engine.module.parameters() if p.requires_grad)
            param.register_hook(lambda g: g.clone().fill_(float("nan")) if trainer.step == nan_step else g)
        before = _cuda.launches["adamw_step"]
        metrics = [trainer.train_step() for _ in range(steps)]
        launches = _cuda.launches["adamw_step"] - before
        masters = full_master_weights(trainer)
        copies = trainer.weight_copies.mapping() if trainer.weight_copies is not None else {}
        optimizer = trainer.clip_optimizer or trainer.optimizer
        copies_equal = all(torch.equal(c, p.detach().to(c.dtype)) for p, c in copies.items())
        return dict(launches=launches, copies=len(copies), copies_equal=copies_equal,
                    copies_by_optimizer=trainer.copies_written_by_optimizer, losses=[m["loss"] for m in metrics], grad_norms=[m["grad_norm"] for m in metrics],
                    masters=masters, fused_clip=trainer.fused_clip,
                    step_kernel=getattr(trainer.clip_optimizer, "step_kernel", None), zero_stage=trainer.engine.zero_optimization_stage(),
                    precision=trainer.precision, lrs=[m["lr"] for m in metrics],
                    skipped=[m["optimizer_skipped_total"] for m in metrics],
                    check_grad_overflow=trainer.ds_config["bf16"]["check_grad_overflow"],
                    optimizer_steps=sorted({float(s["step"]) for s in getattr(optimizer, "state", {}).values() if "step" in s}),
                    moved=max(float((masters[k] - trainer.initial_state[k]).abs().max())
                                                           for k in masters))
    finally:
        trainer.engine.destroy()


def write_json_with_overflow_check(base, stage: str, zero3_json: str) -> str:
    """The run's DeepSpeed JSON with bf16.check_grad_overflow true (one file a rank: no collective yet)."""
    import json
    import os

    from engine.config import deepspeed_config_path

    with open(zero3_json if stage == "3" else deepspeed_config_path(base)) as f:
        ds = json.load(f)
    ds["bf16"] = dict(ds.get("bf16", {}), check_grad_overflow=True)
    os.makedirs(base.train.output_dir, exist_ok=True)
    path = f"{base.train.output_dir}/check_grad_overflow-stage{stage}-rank{os.environ.get('RANK', '0')}.json"
    with open(path, "w") as f:
        json.dump(ds, f)
    return path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--zero3-json", required=True)
    parser.add_argument("--runs", required=True, help="comma-separated stage:precision")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    parser.add_argument("--compare", choices=["fused_clip", "step_kernel", "overflow_check"], default="fused_clip")
    parser.add_argument("--nan-step", type=int, default=None, help="the trainer step whose gradient gets a NaN")
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
        settings = {"fused_clip": [dict(fused_clip="false"), dict(fused_clip="true")],
                    "step_kernel": [dict(fused_clip="true", step_kernel="torch"),
                                    dict(fused_clip="true", step_kernel="alignflow")],
                    "overflow_check": [dict(fused_clip="true", overflow_check=True),
                                       dict(fused_clip="true", overflow_check=None)]}[args.compare]
        for i, setting in enumerate(settings):
            setting = dict(setting)
            value = setting.pop(args.compare, None) if args.compare == "overflow_check" else setting[args.compare]
            ds_json = args.zero3_json if stage == "3" else base.train.deepspeed_config
            if value is not None and args.compare == "overflow_check":  # DeepSpeed's check, set in its JSON
                ds_json = write_json_with_overflow_check(base, stage, args.zero3_json)
            torch_autocast.TORCH_AUTOCAST_INITIALIZED, torch_autocast.TORCH_AUTOCAST_DTYPE = False, None
            train = dataclasses.replace(base.train, zero_stage=int(stage), precision=precision,
                                        bf16_weight_copies="true" if copies == ["copies"] else "false",
                                        output_dir=f"{base.train.output_dir}/{run.replace(':', '-')}-{value}",
                                        deepspeed_config=ds_json)
            cfg = dataclasses.replace(base, train=train, optim=dataclasses.replace(base.optim, **setting))
            started = time.time()
            pair[i] = one_run(cfg, args.steps, args.nan_step)
            print(f"{run} {args.compare}={value}: {time.time() - started:.1f} s", flush=True)
        a, b = pair[0], pair[1]
        results[run] = dict(launches=[a["launches"], b["launches"]], step_kernel=[a["step_kernel"], b["step_kernel"]],
            copies=[a["copies"], b["copies"]], copies_equal=[a["copies_equal"], b["copies_equal"]],
            copies_by_optimizer=[a["copies_by_optimizer"], b["copies_by_optimizer"]],
            fused_clip=[a["fused_clip"], b["fused_clip"]], zero_stage=b["zero_stage"], precision=b["precision"],
            losses=[a["losses"], b["losses"]], lrs=[a["lrs"], b["lrs"]], skipped=[a["skipped"], b["skipped"]],
            check_grad_overflow=[a["check_grad_overflow"], b["check_grad_overflow"]],
            optimizer_steps=[a["optimizer_steps"], b["optimizer_steps"]], grad_norms=[a["grad_norms"], b["grad_norms"]], moved=b["moved"],
            masters_equal=all(torch.equal(a["masters"][k], b["masters"][k]) for k in a["masters"]),
            master_max_diff=max(float((a["masters"][k] - b["masters"][k]).abs().max()) for k in a["masters"]))
    write_on_rank0(args.out, results)


if __name__ == "__main__":
    main()
