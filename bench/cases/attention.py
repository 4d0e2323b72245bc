"""Benchmark cases for kernels.attention_qkv at SiT shapes, against SDPA's backends and peers.

Every variant starts from the packed QKV projection output (B, N, 3 * H * d) and ends with the
(B, N, H * d) input of the output projection, so the split/permute and head-merge work that callers
of SDPA, flash-attn or xformers do is inside each timing (written as timm's `Attention.forward`
does it). Forward variants run under no_grad; forward+backward variants backpropagate a fixed
output gradient to qkv.

FLOP convention: forward = 4 * B * H * N^2 * d (q k^T and P v, two FLOPs per multiply-add), with the
real head dim (72, not a padded 80 or 128); backward = 2.5x forward (recomputed q k^T, dP, dV, dQ,
dK), so forward+backward = 3.5x forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels
from bench.common import BenchCase, Variant, compiled

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - older torch
    SDPBackend = sdpa_kernel = None


def _split_heads(qkv, num_heads):
    B, N, width = qkv.shape
    return qkv.reshape(B, N, 3, num_heads, width // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)


def _sdpa(backend):
    def run(qkv, num_heads):
        q, k, v = _split_heads(qkv, num_heads)  # (B, H, N, d) views, as timm's Attention
        with sdpa_kernel([backend]):
            o = F.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], -1)  # (B, N, H * d)
    return run


def _flash_attn():
    from flash_attn import flash_attn_qkvpacked_func  # takes the packed (B, N, 3, H, d) layout

    def run(qkv, num_heads):
        B, N, width = qkv.shape
        o = flash_attn_qkvpacked_func(qkv.view(B, N, 3, num_heads, width // (3 * num_heads)))
        return o.reshape(B, N, -1)
    return run


def _xformers():
    import xformers.ops

    def run(qkv, num_heads):
        B, N, width = qkv.shape
        q, k, v = qkv.view(B, N, 3, num_heads, width // (3 * num_heads)).unbind(2)  # (B, N, H, d) views
        return xformers.ops.memory_efficient_attention(q, k, v).reshape(B, N, -1)
    return run


def _ours(qkv, num_heads):
    with kernels.use_backend("triton"):
        return kernels.attention_qkv(qkv, num_heads)


def _implementations(device, smoke):
    """name -> (fn(qkv, num_heads) -> o, reason it cannot run or None)."""
    impls = {"reference eager (fp32 softmax)": (kernels.reference_attention_qkv, None)}
    impls["reference compiled"] = compiled(kernels.reference_attention_qkv, smoke)
    for name, attr in (("sdpa flash", "FLASH_ATTENTION"), ("sdpa efficient", "EFFICIENT_ATTENTION"),
                       ("sdpa cudnn", "CUDNN_ATTENTION")):
        if SDPBackend is None or not hasattr(SDPBackend, attr):
            impls[name] = (None, f"torch {torch.__version__} has no SDPBackend.{attr}")
        else:
            impls[name] = (_sdpa(getattr(SDPBackend, attr)), None)
    for name, make in (("flash-attn", _flash_attn), ("xformers", _xformers)):
        try:
            impls[name] = (make(), None)
        except Exception as error:
            impls[name] = (None, f"not importable: {type(error).__name__}: {error}")
    if device.type != "cuda" and not kernels.interpreting():
        impls["ours (attention_qkv)"] = (None, "needs CUDA or TRITON_INTERPRET=1")
    else:
        impls["ours (attention_qkv)"] = (_ours, None)
    return impls


def _trial(fn, qkv, num_heads):
    """None if fn runs on this input (forward and backward), else why not: SDPA backends reject
    head dims, dtypes or devices they do not support with a RuntimeError."""
    try:
        x = qkv[:1].detach().requires_grad_()
        fn(x, num_heads).float().sum().backward()
    except Exception as error:
        return f"unsupported here: {type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"
    return None


def _shape_case(device, label, B, H, N, d, dtype, impls, headline=False):
    qkv = torch.randn(B, N, 3 * H * d, device=device, dtype=dtype)
    qkv_leaf = qkv.clone().requires_grad_()
    grad = torch.randn(B, N, H * d, device=device, dtype=dtype)

    def forward(fn):
        def run():
            with torch.no_grad():
                return fn(qkv, H)
        return lambda: run

    def forward_backward(fn):
        def run():
            qkv_leaf.grad = None
            fn(qkv_leaf, H).backward(grad)
        return lambda: run

    fwd, fwd_bwd = [], []
    for name, (fn, reason) in impls.items():
        if reason is None and name.startswith(("sdpa", "flash-attn", "xformers")):
            reason = _trial(fn, qkv, H)
        fwd.append(Variant(name, forward(fn), reason))
        fwd_bwd.append(Variant(name, forward_backward(fn), reason))
    flops = 4 * B * H * N * N * d
    return BenchCase(
        "attention", f"{label} B={B} H={H} N={N} d={d} {str(dtype)[6:]}", forward=fwd, forward_backward=fwd_bwd,
        flops_forward=flops, flops_forward_backward=3.5 * flops,
        notes="from packed qkv (B, N, 3*H*d) to (B, N, H*d), split/merge included; "
              "flops 4*B*H*N^2*d forward, 3.5x forward+backward", headline=headline)


def cases(device, smoke):
    impls = _implementations(device, smoke)
    if smoke:
        return [_shape_case(device, "smoke", 1, 2, 33, 72, torch.float32, impls),
                _shape_case(device, "smoke", 1, 1, 20, 64, torch.float32, impls)]
    bf16 = torch.bfloat16
    return [_shape_case(device, "SiT-XL/2 256px", 32, 16, 256, 72, bf16, impls, headline=True),
            _shape_case(device, "SiT-B/2 256px", 32, 12, 256, 64, bf16, impls),
            _shape_case(device, "SiT-XL/2 512px", 32, 16, 1024, 72, bf16, impls),
            _shape_case(device, "SiT-XL/2 REG", 32, 16, 257, 72, bf16, impls),
            _shape_case(device, "DINOv2-B encoder", 32, 12, 257, 64, bf16, impls)]
