"""The Hugging Face Hub layout: a folder (or Hub repo) of `config.json` (the whole experiment config:
model, transport, latent space, sampling) and `model.safetensors` (the fp32 EMA weights, our = REPA's
parameter names), written and read through huggingface_hub's `PyTorchModelHubMixin` (`SiTForHub`).
`engine.models.hub` exports a checkpoint to it; `engine.models.pretrained` reads it (`load_hub`).

    model = SiTForHub.from_pretrained("hub/sit-xl2-repa")     # a SiT; model.experiment_config is the config
"""
from __future__ import annotations

import os
import re

from huggingface_hub import PyTorchModelHubMixin

from engine.config import from_dict

from .sit import SiT

HUB_CONFIG, HUB_WEIGHTS = "config.json", "model.safetensors"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SiTForHub(SiT, PyTorchModelHubMixin, library_name="alignflow",
                tags=["sit", "repa", "flow-matching", "image-generation"]):
    """A SiT built from an experiment config mapping (what `config.json` holds)."""

    def __init__(self, config: dict):
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
