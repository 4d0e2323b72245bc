"""Export a checkpoint as a Hugging Face Hub folder (the layout of `engine.models.hub_layout`: config.json
and model.safetensors, through its `SiTForHub`), and optionally push it to a Hub repo.

    python -m engine.models.hub --ckpt runs/sit_xl2/checkpoints --out hub/sit-xl2-repa [--push-to user/sit-xl2-repa]
    python -m engine.sample --ckpt hub/sit-xl2-repa --out runs/eval ...
"""
from __future__ import annotations

import argparse
import logging
import os

from engine.config import load_raw

from .hub_layout import SiTForHub
from .pretrained import load_pretrained

log = logging.getLogger("engine.models.hub")


def export(ckpt: str, out: str, push_to: str | None = None, private: bool = True, config: str | None = None) -> str:
    """Write `ckpt` (an EMA export, checkpoint directory, or any file engine.models.pretrained reads, with
    `config` for one that carries none) as a Hub folder at `out`; with `push_to`, also upload it to that
    Hub repo (needs network and a token). Returns `out`."""
    raw, state, _, source = load_pretrained(ckpt, load_raw(config) if config else None)
    model = SiTForHub(config=raw)
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out)
    log.info("wrote %s (%s) from %s", out, ", ".join(sorted(os.listdir(out))), source)
    if push_to:
        model.push_to_hub(push_to, private=private)
        log.info("pushed to the Hub repo %s", push_to)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="ema_fp32.pt, a checkpoint directory, or a REPA/REG/SiT .pt "
                        "(with --config)")
    parser.add_argument("--out", required=True, help="the folder to write (config.json + model.safetensors)")
    parser.add_argument("--config", default=None, help="YAML for a checkpoint without an AlignFlow config")
    parser.add_argument("--push-to", default=None, help="also upload to this Hub repo (user/name)")
    parser.add_argument("--public", action="store_true", help="create the Hub repo public (default: private)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    export(args.ckpt, args.out, args.push_to, private=not args.public, config=args.config)


if __name__ == "__main__":
    main()
