"""Train a SiT with REPA / REG / CAR-Flow: parse the config, build, train.

    deepspeed --num_gpus 2 --module engine.train --config configs/builtin_cpu.yaml
    torchrun --nproc_per_node 8 -m engine.train --config configs/sit_xl2_repa_256.yaml
    python -m engine.train --config configs/builtin_cpu.yaml train.max_steps=20 optim.lr=3e-4

Trailing `section.key=value` arguments override the YAML. Without a GPU the trainer uses DeepSpeed's
CPU accelerator and gloo (the deepspeed launcher then starts `--num_gpus` CPU ranks).
"""
from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; the rank comes from the environment")
    parser.add_argument("--ckpt", default=None, help="fine-tune from these weights (checkpoint.init_weights): an "
                        "ema_fp32.pt, a Hugging Face folder or a REPA / REG / SiT .pt")
    parser.add_argument("--validate-only", action="store_true", help="check the config and exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from engine.checkpoint import CheckpointWriteError, CorruptCheckpointError
    from engine.config import ConfigError, load_config, locate, validate
    from engine.distributed import world_size_from_env

    cfg = None
    try:
        overrides = list(args.overrides) + ([f"checkpoint.init_weights={args.ckpt}"] if args.ckpt else [])
        cfg = load_config(args.config, overrides)
        if args.validate_only:
            validate(cfg, world_size=world_size_from_env())
            print(f"{args.config}: ok")
            return {}
        from engine.trainer import NonFiniteLossError, Trainer

        trainer = Trainer(cfg)  # validates the config, then checks it against the data and models it builds
    except ConfigError as error:
        _error_line(f"config error: {locate(error, cfg)}")
        raise SystemExit(2)
    except CorruptCheckpointError as error:
        _error_line(f"error: {error}")
        raise SystemExit(1)
    try:
        results = trainer.fit()
    except (CheckpointWriteError, NonFiniteLossError) as error:  # one line; the trainer logged the rest
        _error_line(f"error: rank {trainer.rank}: {error}")
        raise SystemExit(1)
    if trainer.is_main:
        print("done: " + json.dumps(results), flush=True)
    return results


def _error_line(text: str) -> None:
    """One write of the line and its newline: print() writes them apart on stderr, so another rank's log
    line could land between them, on the same line."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    main()
