"""Analytic FLOP counts (multiply-add = 2 FLOPs) of a training step: the SiT's own count lives beside
the model (`SiT.flops_per_sample`); the frozen encoder's is here.

Only matrix products are counted (linear layers, convolutions as matmuls, attention's two products);
norms, activations and losses are memory-bound and left out, as is usual for MFU.
"""
from __future__ import annotations


def vit_forward_flops(embed_dim: int, depth: int, tokens: int, patch_size: int, mlp_ratio: float = 4.0,
                      channels: int = 3) -> float:
    """Forward FLOPs per image of a plain ViT (the frozen encoder)."""
    D, T = embed_dim, tokens
    per_block = 2 * T * D * 3 * D + 2 * T * D * D + 2 * 2 * T * T * D + 2 * 2 * T * D * int(D * mlp_ratio)
    return float(2 * (T - 1) * channels * patch_size ** 2 * D + depth * per_block)


def training_step_flops(model_flops_per_sample: float, batch: int, encoder_flops_per_image: float = 0.0) -> float:
    """Model forward + backward (3x forward) plus the encoder's forward (no grad)."""
    return batch * (3 * model_flops_per_sample + encoder_flops_per_image)
