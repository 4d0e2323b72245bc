"""Frozen representation encoders (REPA targets) through timm.

    encoder = build_encoder(EncoderConfig(name="dinov2-vit-b", weights_path="dinov2_vitb14.safetensors"))
    patch_tokens, cls = encoder(images_uint8)      # (B, N, D), (B, D), float32, no grad

Preprocessing follows REPA: uint8 -> [0, 1] -> the encoder's mean/std (ImageNet for DINOv2) -> bicubic
resize to 224 * resolution / 256 (256 -> 224: 16 x 16 tokens at patch 14, the SiT-XL/2 token grid).
The model is built at that input size; a checkpoint's positional embedding is resampled to it when it
loads. On CUDA the encoder runs in bf16 autocast.
"""
from __future__ import annotations


import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.configurable import FromDict, invalid

# REPA's short names -> timm names (DINOv2 with and without registers).
ALIASES = {
    f"dinov2-vit-{size}{reg}": f"vit_{arch}_patch14_{'reg4_' if reg else ''}dinov2.lvd142m"
    for size, arch in {"s": "small", "b": "base", "l": "large", "g": "giant"}.items()
    for reg in ("", "-reg")
}
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}


@dataclass
class EncoderConfig(FromDict):
    name: str = "dinov2-vit-b"          # a key of ALIASES or any timm model name
    weights_path: str | None = None     # .safetensors / .pth / .pt; None: the local Hugging Face hub cache
    pretrained: bool = True             # False: random weights (tests, smoke runs)
    resolution: int = 256               # image resolution the diffusion model is trained at
    image_size: int | None = None       # encoder input size; default 224 * resolution // 256
    autocast_dtype: str = "bfloat16"    # on CUDA
    model_kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments (e.g. depth for tests)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise invalid("name", self.name, f"one of {', '.join(ALIASES)} or a timm model name")
        if not isinstance(self.resolution, int) or self.resolution < 1:
            raise invalid("resolution", self.resolution, "a positive integer")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 1):
            raise invalid("image_size", self.image_size, "null or a positive integer")
        if not isinstance(self.model_kwargs, dict):
            raise invalid("model_kwargs", self.model_kwargs, "a mapping")
        if self.autocast_dtype not in AUTOCAST_DTYPES:
            raise invalid("autocast_dtype", self.autocast_dtype, f"one of {', '.join(AUTOCAST_DTYPES)}")

    @property
    def timm_name(self) -> str:
        return ALIASES.get(self.name, self.name)

    @property
    def input_size(self) -> int:
        return self.image_size or 224 * self.resolution // 256


def load_state_dict_file(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def _hub_cache_file(timm_name: str) -> tuple[str | None, str]:
    """(cached weight file or None, the hub repo id) for a timm pretrained name, without network."""
    import timm
    cfg = timm.models.get_pretrained_cfg(timm_name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None, ""
    from huggingface_hub import try_to_load_from_cache
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str) and os.path.exists(found):
            return found, repo
    return None, repo


class Encoder(nn.Module):
    """A frozen timm ViT that returns (patch tokens, class token) after its final norm."""

    def __init__(self, cfg: EncoderConfig, model: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.model = model.eval().requires_grad_(False)
        self.embed_dim = model.embed_dim
        self.num_prefix_tokens = getattr(model, "num_prefix_tokens", 1)
        data_cfg = getattr(model, "pretrained_cfg", {}) or {}
        mean = data_cfg.get("mean", (0.485, 0.456, 0.406))
        std = data_cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        grid = model.patch_embed.grid_size
        self.num_patches = grid[0] * grid[1]

    def train(self, mode: bool = True):
        return super().train(False)  # always frozen (dropout / drop-path off)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"encoder expects uint8 images (B, 3, H, W), got shape {tuple(images.shape)}")
        x = images.float() / 255.0
        x = (x - self.mean) / self.std
        size = self.cfg.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        return x

    @torch.no_grad()
    def forward(self, images: torch.Tensor):
        x = self.preprocess(images)
        dtype = AUTOCAST_DTYPES[self.cfg.autocast_dtype]
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=x.is_cuda and dtype is not None):
            tokens = self.model.forward_features(x)                  # (B, prefix + N, D), normed
        tokens = tokens.float()
        return tokens[:, self.num_prefix_tokens:], tokens[:, 0]


def build_encoder(cfg: EncoderConfig, device=None) -> Encoder:
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    name = cfg.timm_name
    if not timm.is_model(name.split(".")[0]):
        raise ValueError(f"EncoderConfig.name={cfg.name!r} is neither an alias {sorted(ALIASES)} nor a timm model")
    path = None
    if cfg.pretrained:
        path = cfg.weights_path
        if path is None:
            path, repo = _hub_cache_file(name)
            if path is None:
                raise FileNotFoundError(
                    f"no weights for encoder {cfg.name!r} ({name}): not in the local Hugging Face hub cache "
                    f"(repo {repo or 'unknown'}). Download them on a machine with network access, e.g. "
                    f"`huggingface-cli download {repo or 'timm/' + name}` (then copy the cache), or set "
                    f"weights_path to a .safetensors/.pth file; pretrained: false gives random weights.")
        elif not os.path.exists(path):
            raise FileNotFoundError(
                f"encoder weights_path {path!r} does not exist. Get the weights for {name} with "
                f"`huggingface-cli download timm/{name} model.safetensors` (or the original DINOv2 .pth "
                f"release) on a machine with network access, or set pretrained: false for random weights.")
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=cfg.input_size, **cfg.model_kwargs)
    if path is not None:
        state = load_state_dict_file(path)
        state = checkpoint_filter_fn(state, model, interpolation="bicubic", antialias=False)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"encoder weights {path!r} do not fit {name}: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}")
    encoder = Encoder(cfg, model)
    return encoder.to(device) if device is not None else encoder
