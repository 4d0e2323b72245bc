"""What the evaluation metrics need from this machine: whether the metrics library (torch-fidelity) can be
imported, and where its Inception weights are. `engine.evaluate` computes with them; config validation
(`engine.config`) asks before any work starts."""
from __future__ import annotations

import os

import torch

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")  # torch_fidelity.feature_extractor_inceptionv3


def default_inception_weights() -> str:
    """Where torch-fidelity keeps (and would download) its Inception weights: the torch hub cache."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(INCEPTION_URL))


def resolve_inception_weights(path: str | None) -> str:
    """The Inception weights file to load; a one-line error where it is missing (nothing downloads)."""
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Inception weights {path!r} do not exist; allowed: the file torch-fidelity "
                                    f"fetches from {INCEPTION_URL}")
        return path
    cached = default_inception_weights()
    if not os.path.isfile(cached):
        raise FileNotFoundError(f"Inception weights not found at {cached}: put the file torch-fidelity fetches "
                                f"from {INCEPTION_URL} there, or pass its path (--inception-weights PATH, "
                                f"eval.inception_weights); nothing is downloaded here")
    return cached


def metrics_library_problem() -> str | None:
    """Why torch-fidelity (every metric here, the encoder figure's Frechet distance included) cannot be
    imported on this machine, or None. Config validation asks before any work, so a missing package
    stops a run at its start, not at its first evaluation. The import is the real one: the package's
    __init__ loads all its modules, which need torchvision, PIL and tqdm besides torch and numpy."""
    try:
        import torch_fidelity.metric_fid
    except ImportError as error:
        return f"{type(error).__name__}: {error}"
    del torch_fidelity  # imported to see that it imports, not to be used
    return None
