"""Frozen representation encoders (REPA targets) through timm.

    encoder = build_encoder(EncoderConfig(name="dinov2-vit-b", weights_path="dinov2_vitb14.safetensors"))
    patch_tokens, cls = encoder(images_uint8)      # (B, N, D), (B, D), float32, no grad

Preprocessing follows REPA: uint8 -> [0, 1] -> the encoder's mean/std (ImageNet for DINOv2) -> bicubic
resize to 224 * resolution / 256 (256 -> 224: 16 x 16 tokens at patch 14, the SiT-XL/2 token grid).
The model is built at that input size; a checkpoint's positional embedding is resampled to it when it
loads. On CUDA the encoder runs in bf16 autocast.

The fused path (`fused: true`, the default) changes only what runs on CUDA under a half-precision
`autocast_dtype`: the Linear and Conv2d weights (the matmuls' operands) are cast to that dtype once, on
the first call, instead of by autocast on every call (the LayerNorms, LayerScale, positional embedding
and the residual stream stay fp32), and each block's softmax(q k^T) v runs through
`kernels.attention_qkv` straight from the packed QKV projection (the Triton kernel under the
"triton"/"cuda" backends, PyTorch's SDPA under "torch"). `compile_features()` compiles the forward
(the trainer calls it under `train.compile`). Everywhere else (the CPU, fp32) the encoder runs timm's
own code as before, bit for bit. `fused: false` is REPA's path on CUDA too.
"""
from __future__ import annotations


import functools
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
    fused: bool = True                  # on CUDA: weights cast once, attention on kernels.attention_qkv

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
        if not isinstance(self.fused, bool):
            raise invalid("fused", self.fused, "true or false")

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


HALF_DTYPES = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def kernel_attention_class():
    """`KernelAttention`: timm's `Attention` whose softmax(q k^T) v runs through `kernels.attention_qkv`
    on the packed QKV projection once its `use_kernel` is set (the encoder sets it when it casts its
    weights to a half dtype); otherwise, and for what the kernel path does not cover (a mask, causal
    attention, qk-norm, a gate, attention dropout in training), timm's own forward. Same parameters and
    state_dict keys. Built on first use (timm is the `train` extra)."""
    from timm.models.vision_transformer import Attention

    class KernelAttention(Attention):
        use_kernel = False

        def forward(self, x, attn_mask=None, is_causal=False):
            if (not self.use_kernel or attn_mask is not None or is_causal or getattr(self, "gate", None) is not None
                    or not isinstance(self.q_norm, nn.Identity) or not isinstance(self.k_norm, nn.Identity)
                    or (self.training and self.attn_drop.p > 0)):
                return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
            import kernels

            qkv = self.qkv(x)                                                 # (B, N, 3 * H * d)
            x = kernels.attention_qkv(qkv, self.num_heads, scale=self.scale)  # (B, N, H * d)
            return self.proj_drop(self.proj(self.norm(x)))

    return KernelAttention


def use_kernel_attention(model: nn.Module) -> int:
    """Give every timm `Attention` of `model` the `KernelAttention` forward (in place: parameters and
    keys unchanged); returns how many."""
    kernel_attention = kernel_attention_class()
    count = 0
    for module in model.modules():
        if type(module) is kernel_attention.__base__:
            module.__class__ = kernel_attention
            count += 1
    return count


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
        # The device types on which autocast_dtype applies. bench.model adds "cpu" to trace the CUDA path on
        # fake CPU tensors, the tests to check the fused path on the CPU; no one else needs to touch it.
        self.low_precision_devices = ("cuda",)
        self.weights_dtype = None  # the half dtype the matmul weights were cast to (fused path), once
        self.kernel_attention = use_kernel_attention(model) if cfg.fused else 0
        self._compiled = None  # compile_features()

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

    def autocast_dtype(self, device: torch.device):
        """The dtype the encoder runs its matmuls in on `device` (None: fp32, no autocast)."""
        dtype = AUTOCAST_DTYPES[self.cfg.autocast_dtype]
        return dtype if device.type in self.low_precision_devices else None

    def cast_weights(self, dtype) -> None:
        """The fused path's one-time cast: Linear and Conv2d weights and biases to `dtype` (a half
        dtype), attention onto the kernel. LayerNorm, LayerScale, tokens and positional embedding stay
        fp32, so under autocast the normalisation statistics and the residual stream keep fp32."""
        if not self.cfg.fused or dtype not in HALF_DTYPES or self.weights_dtype == dtype:
            return
        for module in self.model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.to(dtype)
            if isinstance(module, kernel_attention_class()):
                module.use_kernel = True
        self.weights_dtype = dtype

    def compile_features(self, enabled: bool = True, **kwargs) -> None:
        """torch.compile the forward after the one-time cast (preprocessing, the ViT, the split), with
        torch.compile's `kwargs`; `enabled=False` returns to eager."""
        self._compiled = torch.compile(self.features, **kwargs) if enabled else None

    def features(self, images: torch.Tensor, dtype):
        x = self.preprocess(images)
        if x.device.type in self.low_precision_devices:  # autocast_dtype, or autocast off for float32
            with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                tokens = self.model.forward_features(x)              # (B, prefix + N, D), normed
        else:
            tokens = self.model.forward_features(x)
        tokens = tokens.float()
        return tokens[:, self.num_prefix_tokens:], tokens[:, 0]

    @torch.no_grad()
    def forward(self, images: torch.Tensor):
        dtype = self.autocast_dtype(images.device)
        if dtype is not None:
            self.cast_weights(dtype)
        return (self._compiled or self.features)(images, dtype)


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
