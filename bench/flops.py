"""Analytic FLOP counts (multiply-add = 2 FLOPs) of a SiT training step and its frozen encoder.

Only matrix products are counted (linear layers, convolutions as matmuls, attention's two products);
norms, activations and losses are memory-bound and left out, as is usual for MFU.
"""
from __future__ import annotations


def sit_forward_flops(cfg, batch: int) -> float:
    """Forward FLOPs of `engine.models.build_model(cfg)` for `batch` samples."""
    D, L, p, C = cfg.hidden_size, cfg.depth, cfg.patch_size, cfg.in_channels
    T = cfg.num_patches + (1 if cfg.reg else 0)
    hidden = int(D * cfg.mlp_ratio)
    per_sample = 2 * cfg.num_patches * (C * p * p) * D                  # patch embedding
    per_sample += 2 * (256 * D + D * D)                                 # timestep MLP
    per_block = (2 * T * D * 3 * D + 2 * T * D * D                      # qkv, output projection
                 + 2 * 2 * T * T * D                                    # q k^T and p v
                 + 2 * 2 * T * D * hidden                               # MLP
                 + 2 * D * 6 * D)                                       # adaLN modulation
    per_sample += L * per_block
    per_sample += 2 * D * 2 * D + 2 * cfg.num_patches * D * (p * p * C)  # final layer
    for z_dim in cfg.z_dims:                                            # REPA projectors
        P = cfg.projector_dim
        per_sample += 2 * T * (D * P + P * P + P * z_dim)
    return float(batch * per_sample)


def vit_forward_flops(embed_dim: int, depth: int, tokens: int, patch_size: int, mlp_ratio: float = 4.0,
                      channels: int = 3) -> float:
    """Forward FLOPs per image of a plain ViT (the frozen encoder)."""
    D, T = embed_dim, tokens
    per_block = 2 * T * D * 3 * D + 2 * T * D * D + 2 * 2 * T * T * D + 2 * 2 * T * D * int(D * mlp_ratio)
    return float(2 * (T - 1) * channels * patch_size ** 2 * D + depth * per_block)


def training_step_flops(cfg, batch: int, encoder_flops_per_image: float = 0.0) -> float:
    """Model forward + backward (3x forward) plus the encoder's forward (no grad)."""
    return 3 * sit_forward_flops(cfg, batch) + batch * encoder_flops_per_image
