"""Run under the deepspeed launcher by test_train_distributed.py (two CPU ranks): the same bf16-mixed run
with train.bf16_weight_copies false, then true (forced on, as 'auto' is on a GPU); per run the loss of each
step and the weights after it, and with the copies whether every copy equals its weight rounded to bf16
after every step on every rank. Rank 0 writes the results as JSON to --out.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.distributed as dist

from tests.engine.worker_results import write_on_rank0


def copies_fresh(trainer) -> bool:
    """Whether every copy on this rank and on every other equals its weight rounded to bf16."""
    stale = torch.tensor([sum(not torch.equal(copy, param.detach().to(torch.bfloat16))
                              for param, copy in trainer.weight_copies.mapping().items())], dtype=torch.float64)
    dist.all_reduce(stale)
    return int(stale) == 0


def run(cfg, copies: str) -> dict:
    from deepspeed.runtime import torch_autocast

    from engine.trainer import Trainer

    torch_autocast.TORCH_AUTOCAST_INITIALIZED, torch_autocast.TORCH_AUTOCAST_DTYPE = False, None
    trainer = Trainer(dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, bf16_weight_copies=copies, output_dir=f"{cfg.train.output_dir}_{copies}")))
    losses, fresh = [], []
    while trainer.step < cfg.train.max_steps:
        losses.append(trainer.train_step()["loss"])
        if trainer.weight_copies is not None:
            fresh.append(copies_fresh(trainer))
    weights = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    result = dict(losses=losses, fresh=fresh, with_copies=trainer.weight_copies is not None,
                  written_by_optimizer=trainer.copies_written_by_optimizer, accum=trainer.accum,
                  zero_stage=trainer.engine.zero_optimization_stage(), world_size=dist.get_world_size())
    trainer.engine.destroy()
    return result, weights


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    from engine.config import load_config

    cfg = load_config(args.config)
    without, weights_without = run(cfg, "false")
    with_copies, weights_with = run(cfg, "true")
    differ = sorted(n for n in weights_without if not torch.equal(weights_without[n], weights_with[n]))
    moved = max(float((weights_with[n] - v).abs().max()) for n, v in weights_without.items())
    write_on_rank0(args.out, dict(without=without, with_copies=with_copies, weights_differ=differ,
                                  weights_max_difference=moved))


if __name__ == "__main__":
    main()
