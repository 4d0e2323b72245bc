"""The Hugging Face Hub layout: a folder (or Hub repo) of `config.json` (the whole experiment config:
model, transport, latent space, sampling) and `model.safetensors` (the fp32 EMA weights, our = REPA's
parameter names), written and read through huggingface_hub's `PyTorchModelHubMixin`.

    python -m engine.models.hub --ckpt runs/sit_xl2/checkpoints --out hub/sit-xl2-repa [--push-to user/sit-xl2-repa]
    python -m engine.sample --ckpt hub/sit-xl2-repa --out runs/eval ...

    model = SiTForHub.from_pretrained("hub/sit-xl2-repa")     # a SiT; model.experiment_config is the config
"""
from __future__ import annotations

import argparse
import logging
import os
import re

from huggingface_hub import PyTorchModelHubMixin

from .sit import SiT

log = logging.getLogger("engine.models.hub")

HUB_CONFIG, HUB_WEIGHTS = "config.json", "model.safetensors"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SiTForHub(SiT, PyTorchModelHubMixin, library_name="alignflow",
                tags=["sit", "repa", "flow-matching", "image-generation"]):
    """A SiT built from an experiment config mapping (what `config.json` holds)."""

    def __init__(self, config: dict):
        from engine.config import from_dict

        super().__init__(from_dict(config).model)
        self.experiment_config = config


def is_hub_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, HUB_CONFIG))


def is_hub_reference(path: str) -> bool:
    """A local Hub folder, or a Hub repo id ("user/name") that is not a local path."""
    return is_hub_folder(path) or (not os.path.exists(path) and bool(REPO_ID.match(path)))


def load_hub(path: str) -> tuple[dict, dict]:
    """(experiment config dict, fp32 state dict) of a Hub folder or repo id, read strict. A repo id is
    fetched from the Hub, or from the local cache under HF_HUB_OFFLINE=1."""
    local_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, HUB_WEIGHTS)):
        raise FileNotFoundError(f"{path} has {HUB_CONFIG} but no {HUB_WEIGHTS}")
    model = SiTForHub.from_pretrained(path, strict=True, local_files_only=local_only)
    return model.experiment_config, model.state_dict()


def export(ckpt: str, out: str, push_to: str | None = None, private: bool = True, config: str | None = None) -> str:
    """Write `ckpt` (an EMA export, checkpoint directory, or any file engine.models.pretrained reads, with
    `config` for one that carries none) as a Hub folder at `out`; with `push_to`, also upload it to that
    Hub repo (needs network and a token). Returns `out`."""
    from engine.config import load_raw
    from .pretrained import load_pretrained

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
