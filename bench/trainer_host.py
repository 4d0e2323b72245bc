"""Host time of one training step, phase by phase: the trainer's step under each DeepSpeed ZeRO stage and
precision beside the benchmark's plain eager step, for SiT-XL/2's structure at a tiny width, on the CPU.

    python -m bench.trainer_host [--hidden 16] [--stages 0,1,2] [--precisions bf16,bf16-mixed]
                                 [--fused-clip true,false] [--rounds 5] [--smoke]

The model has SiT-XL/2's 28 blocks, 16 heads and parameter tensors, so DeepSpeed's per-parameter
gradient hooks and bucket copies, its optimizer passes and the EMA's per-tensor work are SiT-XL/2's, but
width `--hidden` (16: one channel a head), 4 tokens (32 px, 4x4 latents, patch 2) and batch 2: the
arithmetic is negligible (at width 64 the rows took 10-50% longer on 2026-12-04, at 128 up to twice as
long: arithmetic, not host work) and the CPU time of each phase (time.process_time of this process, one
intra-op thread) is host work, what the CPU spends issuing the step; on a GPU that enqueues kernels more
slowly than they run, it is the step time. (The first H200 run: trainer-bf16 175.8 ms against the benchmark's eager alignflow 102.6 ms.)

Rows:
  eager             bench.train_step.one_step (the alignflow variant's step): fp32 weights under bf16
                    autocast, engine.optim.ClippedAdamW (torch's fused AdamW, the clip inside), no
                    DeepSpeed, no EMA
  trainer-<p>-zero<s> bench.train_step's trainer variant (engine.trainer.Trainer.train_step:
                    configs/deepspeed/zero2.json with train.zero_stage s, train.precision p, its EMA update,
                    the finite-loss all-reduce) on one gloo rank with DeepSpeed's CPU accelerator, with
                    optim.fused_clip on (its 'auto' on a GPU; `--fused-clip false` adds rows with it
                    off, "-unfused-clip") and one fixed batch (train.debug_fixed_batch). bf16 at ZeRO-0
                    does not run: DeepSpeed then wraps the optimizer in its bf16-gradient
                    FP16_UnfusedOptimizer, which neither the fused clip nor the EMA takes, and the
                    trainer refuses it as it is built (the row gives its reason)
Both run the kernels backend "torch" (the trainer's 'auto' on the CPU; the Triton path would run in the
interpreter here), so the rows differ by what wraps the model, not by the kernels. Each phase is the
median over `--steps` steps, the best of `--rounds` rounds (the least disturbed by other work on the
machine); phases as bench.train_step's (the trainer's forward includes its finite-loss check, its
optimizer the EMA update and the gradient-norm read). Writes bench/results/trainer_host-cpu-<date>.json
and prints its table; `--smoke` runs a 2-block model for one round of one step (CI keeps it working; its
numbers mean nothing).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from bench import train_step
from bench.common import environment, write_results

PHASES = train_step.PHASES


def tiny_args(args) -> argparse.Namespace:
    """bench.train_step's arguments for these rows: the model at 32 px, batch 2, the encoder REPA's depth,
    one fixed batch (optim.fused_clip: trainer_row's)."""
    return argparse.Namespace(
        model=args.model, batch=args.batch, resolution=32, encoder="vit_tiny_patch16_224", encoder_depth=8,
        reg=False, car_flow="none", smoke=False, loader="none", trainer_fused_clip="true",
        warmup=args.warmup, steps=args.steps, rounds=args.rounds)


def best_phases(step, args, device) -> tuple[dict, object]:
    """Host seconds per phase and per step of `step(mark)`: the per-round medians' minimum over
    args.rounds rounds of args.steps steps (args.warmup untimed steps before the first); and the last
    step's return value."""
    rounds = []
    for i in range(args.rounds):
        shape = argparse.Namespace(warmup=args.warmup if i == 0 else 0, steps=args.steps, batch=args.batch)
        row, out = train_step.timed_steps(step, shape, device, clock=time.process_time)
        rounds.append(row["breakdown_seconds"])
    return {k: min(r[k] for r in rounds) for k in rounds[0]}, out


def eager_row(step_args, parts, device) -> dict:
    from engine.models import build_model

    encoder, model_cfg, transport, _ = parts
    torch.manual_seed(0)
    model = build_model(model_cfg).train()
    optimizer = train_step.make_optimizer(model.parameters(), True, device)
    latents = torch.randn(step_args.batch, 4, 4, 4)
    images = torch.randint(0, 256, (step_args.batch, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 1000, (step_args.batch,))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    inputs = (model, model, optimizer, encoder, transport, latents, model_cfg, autocast, "torch", images, labels)

    def step(mark):
        mark("data")
        phases = iter(PHASES[1:])
        return train_step.one_step(*inputs, mark=lambda: mark(next(phases)))

    seconds, losses = best_phases(step, step_args, device)
    return {"row": "eager", "seconds": seconds, "final_loss": float(losses["loss"].detach())}


def trainer_row(precision, stage, fused_clip, step_args, parts, device, latents_root) -> dict:
    step_args = argparse.Namespace(**dict(vars(step_args), trainer_fused_clip="true" if fused_clip else "false"))
    with train_step.trainer_variant(step_args, parts, precision, False, latents_root, zero_stage=stage) as trainer:
        torch.set_num_threads(1)
        seconds, metrics = best_phases(trainer.train_step, step_args, device)
        facts = {"precision": trainer.precision, "zero_stage": trainer.engine.zero_optimization_stage(),
                 "optimizer": type(trainer.engine.optimizer).__name__, "ema": sorted(set(trainer.ema.kinds)),
                 "fused_clip": trainer.fused_clip}
    return {"row": trainer_row_name(precision, stage, fused_clip), "seconds": seconds, "final_loss": metrics["loss"],
            **facts}


def trainer_row_name(precision, stage, fused_clip) -> str:
    return f"trainer-{precision}-zero{stage}" + ("" if fused_clip else "-unfused-clip")


def markdown(payload) -> str:
    lines = [f"Host (CPU) time of one step, ms: {payload['model']} structure ({payload['parameter_tensors']} parameter "
             f"tensors) at hidden {payload['hidden']}, {payload['tokens']} tokens, batch {payload['batch']}, on "
             f"{payload['environment']['device']} (torch {payload['environment']['torch']}, DeepSpeed "
             f"{payload['deepspeed']}, {payload['environment']['date']}); best of {payload['rounds']} rounds of "
             f"{payload['steps']} steps' medians. Not a GPU measurement.", "",
             "| row | data + encoder | fwd+loss | backward | optimizer | step | DeepSpeed's optimizer |",
             "|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['row']} | skipped: {r['skipped']} |" + " |" * 5)
            continue
        s = r["seconds"]
        lines.append(f"| {r['row']} | {1e3 * (s['data'] + s['encoder']):.1f} | {1e3 * s['forward']:.1f} | "
                     f"{1e3 * s['backward']:.1f} | {1e3 * s['optimizer']:.1f} | {1e3 * s['step']:.1f} | "
                     f"{r.get('optimizer', 'none')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SiT-XL/2")
    parser.add_argument("--hidden", type=int, default=16,
                        help="hidden width, a multiple of the preset's heads (16: one channel a head)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--stages", default="0,1,2")
    parser.add_argument("--precisions", default="bf16,bf16-mixed")
    parser.add_argument("--fused-clip", default="true",
                        help="optim.fused_clip of the trainer rows: true (its 'auto' on a GPU), false, or true,false")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="a 2-block model, one round of one step")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.rounds = 1, 1, 1
    stages = [int(s) for s in args.stages.split(",")]
    if not set(stages) <= {0, 1, 2}:
        parser.error(f"--stages {args.stages!r}: allowed 0, 1, 2 (ZeRO-3 partitions the weights: not this question)")
    precisions = args.precisions.split(",")
    if not set(precisions) <= {"bf16", "bf16-mixed", "fp32"}:
        parser.error(f"--precisions {args.precisions!r}: allowed bf16, bf16-mixed, fp32")
    clips = [{"true": True, "false": False}.get(c) for c in args.fused_clip.split(",")]
    if None in clips:
        parser.error(f"--fused-clip {args.fused_clip!r}: allowed true, false or true,false")
    device = torch.device("cpu")
    torch.set_num_threads(1)  # process time is then one thread's: the work a GPU's host thread does

    from importlib.metadata import version

    from engine.models import ModelConfig

    heads = ModelConfig(name=args.model).num_heads
    overrides = dict(hidden_size=args.hidden, num_heads=heads, **({"depth": 2} if args.smoke else {}))
    step_args = tiny_args(args)
    parts = train_step.build(step_args, device, model_overrides=overrides)
    latents_root = train_step.latent_shards(step_args, device)
    from engine.models import build_model

    with torch.device("meta"):
        tensors = sum(1 for p in build_model(parts[1]).parameters() if p.requires_grad)
    rows = []
    payload = {"environment": environment(), "model": args.model, "hidden": args.hidden, "depth": parts[1].depth,
               "num_heads": heads, "tokens": parts[1].num_patches, "batch": args.batch, "parameter_tensors": tensors,
               "steps": args.steps, "rounds": args.rounds, "deepspeed": version("deepspeed"),
               "clock": "time.process_time, one intra-op thread", "rows": rows}
    jobs = [("eager", lambda: eager_row(step_args, parts, device))]
    jobs += [(trainer_row_name(p, s, c),
              lambda p=p, s=s, c=c: trainer_row(p, s, c, step_args, parts, device, latents_root))
             for c in clips for p in precisions for s in stages]
    for name, job in jobs:
        try:
            row = job()
        except Exception as error:  # a configuration DeepSpeed's CPU accelerator cannot run is reported with its reason
            row = {"row": name, "skipped": f"{type(error).__name__}: {str(error)[:300]}"}
        rows.append(row)
        print({k: v for k, v in row.items() if k != "seconds"}, flush=True)
    if args.smoke:
        print(markdown(payload))
        return 1 if any("skipped" in r for r in rows) else 0
    write_results("trainer_host", payload, args.out, lambda: markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
