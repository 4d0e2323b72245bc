"""Non-causal multi-head attention for SiT shapes.

    attention(q, k, v, scale=None) -> o                 q, k, v, o: (B, H, N, d)
    attention_qkv(qkv, num_heads, scale=None) -> o      qkv: (B, N, 3 * H * d) -> o: (B, N, H * d)

The Triton kernels are being written (issue 4); until then every backend runs the reference.
"""
from __future__ import annotations

import torch

from ._backend import fallback, get_backend


def reference_attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v, computed in fp32 (fp64 for fp64 inputs)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * scale
    return (scores.softmax(-1) @ v.to(dtype)).to(q.dtype)


def split_qkv(qkv, num_heads):
    """(B, N, 3 * H * d) -> q, k, v each (B, H, N, d), as the public SiT code permutes them."""
    B, N, width = qkv.shape
    return qkv.reshape(B, N, 3, num_heads, width // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)


def reference_attention_qkv(qkv, num_heads, scale=None):
    q, k, v = split_qkv(qkv, num_heads)
    o = reference_attention(q, k, v, scale)
    return o.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], -1)


def attention(q, k, v, scale=None):
    if get_backend() != "torch":
        fallback("attention", "Triton kernel not written yet")
    return reference_attention(q, k, v, scale)


def attention_qkv(qkv, num_heads, scale=None):
    if get_backend() != "torch":
        fallback("attention_qkv", "Triton kernel not written yet")
    return reference_attention_qkv(qkv, num_heads, scale)
