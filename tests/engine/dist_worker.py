"""Run under the deepspeed launcher by the trainer tests (two CPU ranks):

    --mode ema     train with a fixed batch; after every step update a reference EMA computed from the
                   full fp32 master weights (gathered), and compare it with the sharded EMA at the end
    --mode resume  run A: max_steps with a checkpoint half-way; run B: resume A's half-way checkpoint
                   in a new directory; report both loss sequences
Rank 0 writes the results as JSON to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import torch.distributed as dist

from tests.engine.worker_results import write_on_rank0


def full_master_weights(trainer) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, param in trainer.engine.module.named_parameters():
        if param.requires_grad:
            full = safe_get_full_fp32_param(param)
            out[name] = (param.detach().float() if full is None else full).detach().cpu().clone()
    return out


def run_ema(cfg) -> dict:
    from engine.ema import reference_ema
    from engine.trainer import Trainer

    trainer = Trainer(cfg)
    reference = {k: v.float().clone() for k, v in trainer.initial_state.items()}
    losses, grad_norms = [], []
    while trainer.step < cfg.train.max_steps:
        metrics = trainer.train_step()
        losses.append(metrics["loss"])
        grad_norms.append(metrics["grad_norm"])
        reference = reference_ema(reference, full_master_weights(trainer).items(), cfg.ema.decay)
    ema = trainer.ema.full_state_dict()
    errors = {k: float((ema[k] - reference[k]).abs().max()) for k in reference}
    masters = full_master_weights(trainer)
    moved = max(float((masters[k] - trainer.initial_state[k]).abs().max()) for k in masters)
    zero_stage = trainer.engine.zero_optimization_stage()
    partitioned = sum(1 for p in trainer.engine.module.parameters() if getattr(p, "ds_id", None) is not None
                      and p.numel() == 0)
    return dict(losses=losses, grad_norms=grad_norms, ema_max_error=max(errors.values()),
                ema_worst=max(errors, key=errors.get), ema_keys=sorted(ema), reference_keys=sorted(reference),
                masters_moved=moved, zero_stage=zero_stage, partitioned_params=partitioned,
                world_size=dist.get_world_size(), ema_vs_initial=max(
                    float((ema[k] - trainer.initial_state[k].float()).abs().max()) for k in reference))


def run_resume(cfg) -> dict:
    from engine.trainer import Trainer

    half = cfg.train.max_steps // 2
    first = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, every=half, resume="none"))
    a = Trainer(first)
    init_error = max(float((v - a.initial_state[k].float()).abs().max()) for k, v in full_master_weights(a).items())
    losses_a = [a.train_step()["loss"] for _ in range(half)]
    a.save()
    losses_a += [a.train_step()["loss"] for _ in range(cfg.train.max_steps - half)]
    ema_a = a.ema.full_state_dict()

    resume_from = os.path.join(cfg.train.output_dir, "checkpoints", f"step_{half:08d}")
    second = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, output_dir=cfg.train.output_dir + "_resumed"),
        checkpoint=dataclasses.replace(cfg.checkpoint, resume=resume_from))
    b = Trainer(second)
    start = b.step
    losses_b = [b.train_step()["loss"] for _ in range(cfg.train.max_steps - start)]
    ema_b = b.ema.full_state_dict()
    ema_diff = max(float((ema_a[k] - ema_b[k]).abs().max()) for k in ema_a)
    return dict(losses_a=losses_a, losses_b=losses_b, resumed_at=start, ema_diff=ema_diff,
                init_master_error=init_error, zero_stage=a.engine.zero_optimization_stage(), precision=a.precision)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--mode", choices=("ema", "resume"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    from engine.config import load_config

    cfg = load_config(args.config)
    result = run_ema(cfg) if args.mode == "ema" else run_resume(cfg)
    write_on_rank0(args.out, result)


if __name__ == "__main__":
    main()
