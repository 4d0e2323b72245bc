"""adaLN-Zero glue of a SiT block: LayerNorm (no affine) + modulate, and gated residual + the same.

    adaln_modulate(x, shift, scale)               y = LN(x) * (1 + scale) + shift
    adaln_residual_modulate(x, h, gate, shift, scale)
                                                  x_new = x + gate * h;  y = LN(x_new) * (1 + scale) + shift

x, h: (B, N, D); shift, scale, gate: (B, D) or (B, 1, D). LN as nn.LayerNorm(D, elementwise_affine=False).
The Triton kernels are being written (issue 3); until then every backend runs the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import fallback, get_backend


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.unsqueeze(1) if v.dim() == 2 else v


def reference_adaln_modulate(x, shift, scale, eps=1e-6):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = F.layer_norm(x.to(dtype), (x.shape[-1],), eps=eps)
    return (y * (1 + _per_sample(scale).to(dtype)) + _per_sample(shift).to(dtype)).to(x.dtype)


def reference_adaln_residual_modulate(x, h, gate, shift, scale, eps=1e-6):
    x_new = x + _per_sample(gate) * h
    return x_new, reference_adaln_modulate(x_new, shift, scale, eps)


def adaln_modulate(x, shift, scale, eps=1e-6):
    if get_backend() != "torch":
        fallback("adaln_modulate", "Triton kernel not written yet")
    return reference_adaln_modulate(x, shift, scale, eps)


def adaln_residual_modulate(x, h, gate, shift, scale, eps=1e-6):
    if get_backend() != "torch":
        fallback("adaln_residual_modulate", "Triton kernel not written yet")
    return reference_adaln_residual_modulate(x, h, gate, shift, scale, eps)
