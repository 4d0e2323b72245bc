"""kernels.attention / attention_qkv against softmax(q k^T * scale) v (CPU: Triton interpreter).

The interpreter is slow, so shapes stay small (B * H <= 4, N <= 80) except a few single-head cases
at N = 257 (the REG class token). The interpreter runs tiles of 32, so N = 45 or 80 already gives
several query and key blocks with masked tails.
"""
import importlib
import logging

import pytest
import torch
from torch import nn

import kernels
from kernels import _backend
from kernels.attention import head_tiles, split_qkv
from tests.helpers import assert_close, grads, leaf, poisoned_empty

HEAD_DIMS = [64, 72, 96, 128]


def _exact(device):
    """fp64 on the CPU; on the GPU fp64 runs the reference by design, so the exact checks use fp32."""
    return torch.float64 if device.type == "cpu" else torch.float32


def _ran_kernel(out):
    return type(out.grad_fn).__name__ in ("AttentionBackward", "AttentionQkvBackward")


def _compare(fn, inputs, dtype, zero_grads=(), **kwargs):
    """Run fn on the triton and torch backends (outputs poisoned), compare output and every input
    gradient under a random output gradient; return the triton results. Gradients at positions in
    `zero_grads` are exactly zero in exact arithmetic: their absolute tolerance is scaled by the
    largest other gradient, since rounding noise is all they have."""
    if dtype == torch.float64 and inputs[0].device.type == "cuda":
        pytest.skip("fp64 runs the reference on the GPU by design (the kernel's fp64 path is for CPU tests)")
    results = {}
    g = None
    for backend in ("triton", "torch"):
        with kernels.use_backend(backend), poisoned_empty():
            out = fn(*inputs, **kwargs)
        if backend == "triton":
            assert _ran_kernel(out), "the Triton kernel did not run"
        g = torch.randn(out.shape, dtype=torch.float64, device=out.device).to(out.dtype) if g is None else g
        with poisoned_empty():
            out.backward(g)
        results[backend] = [out] + grads(inputs)
    names = ["o"] + [f"grad {i}" for i in range(len(inputs))]
    largest = max(float(x.abs().max()) for x in results["torch"][1:])
    for i, (name, actual, expected) in enumerate(zip(names, results["triton"], results["torch"])):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
        assert_close(actual, expected, dtype, name=name, scale=max(1.0, largest) if i - 1 in zero_grads else None)
    return results["triton"]


def _qkv(shape, dtype, device):
    return [leaf(shape, dtype, device) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_forward_and_grads(dtype, head_dim, device):
    """B * H = 4 distinct heads, N = 45 (two 32-blocks, masked tail)."""
    _compare(kernels.attention, _qkv((2, 2, 45, head_dim), dtype, device), dtype)


@pytest.mark.parametrize("n", [1, 16, 31, 33, 80])
def test_sequence_lengths(n, device):
    _compare(kernels.attention, _qkv((1, 2, n, 72), torch.float32, device), torch.float32)


@pytest.mark.parametrize("head_dim", [72, 64])
def test_reg_length_257(head_dim, device):
    """N = 257: 256 patch tokens plus REG's class token; one head to keep the interpreter quick."""
    _compare(kernels.attention, _qkv((1, 1, 257, head_dim), torch.float32, device), torch.float32)


def test_encoder_shape_bf16_packed_257():
    """The frozen DINOv2 encoder's shape: packed bf16 qkv, head dim 64, N = 257 (256 patches and the class
    token: masked tails in every block); one head of DINOv2-B's 12 to keep the interpreter quick."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    qkv = leaf((1, 257, 3 * 64), torch.bfloat16, device)
    _compare(kernels.attention_qkv, [qkv], torch.bfloat16, num_heads=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [72, 128])
def test_half_precision(dtype, head_dim, device):
    _compare(kernels.attention, _qkv((1, 2, 40, head_dim), dtype, device), dtype)


@pytest.mark.parametrize("head_dim", [16, 40, 80, 100])
def test_other_head_dims(head_dim, device):
    """Head dims with a masked tail tile (40 = 32 + 16 of which 8 used, 100 = 64 + 64 of which 36)."""
    _compare(kernels.attention, _qkv((1, 2, 20, head_dim), torch.float32, device), torch.float32)


def test_scale_and_large_logits(device):
    """An explicit scale, and logits (up to ~1500) large enough that exp overflows even in fp64
    unless the softmax subtracts the running max."""
    q, k, v = _qkv((1, 2, 40, 72), torch.float64, device)
    with torch.no_grad():
        q.mul_(100)
    _compare(kernels.attention, [q, k, v], torch.float64, scale=0.5)


def test_heads_are_independent(device):
    """Each (batch, head) output depends only on its own head: heads with very different inputs give
    what the reference gives one head at a time."""
    q, k, v = (torch.randn(2, 2, 37, 72, device=device) for _ in range(3))
    for i, factor in enumerate((1.0, 5.0, 0.1, 2.0)):
        q[i // 2, i % 2] *= factor
        v[i // 2, i % 2] += i
    with kernels.use_backend("triton"):
        o = kernels.attention(q, k, v)
    for b in range(2):
        for h in range(2):
            expected = kernels.reference_attention(q[b, h][None, None], k[b, h][None, None], v[b, h][None, None])
            assert_close(o[b, h], expected[0, 0], torch.float32, name=f"head {b},{h}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("head_dim,num_heads", [(72, 2), (64, 3), (96, 1)])
def test_packed_qkv(dtype, head_dim, num_heads, device):
    """attention_qkv on the (B, N, 3 * H * d) projection output against the permuting reference,
    gradient in the packed layout."""
    qkv = leaf((2, 37, 3 * num_heads * head_dim), dtype, device)
    out, d_qkv = _compare(kernels.attention_qkv, [qkv], dtype, num_heads=num_heads)
    assert out.shape == (2, 37, num_heads * head_dim) and out.is_contiguous()
    assert d_qkv.shape == qkv.shape


def test_packed_qkv_strided_rows(device):
    """qkv as a column slice of a wider buffer (row stride > 3 * H * d): read in place via strides."""
    buffer = torch.randn(2, 50, 3 * 2 * 72 + 24, device=device, dtype=_exact(device))
    qkv = buffer[:, :, 8:8 + 3 * 2 * 72].requires_grad_()
    assert not qkv.is_contiguous()
    _compare(kernels.attention_qkv, [qkv], _exact(device), num_heads=2)


def test_packed_qkv_reads_in_place(device, monkeypatch):
    """The kernels get views into qkv and write o straight into the (B, N, H * d) output: no copy."""
    module = importlib.import_module("kernels.attention")  # the package attribute is the function
    seen = {}
    real_forward = module._forward

    def spy(q, k, v, o, *args):
        seen["ptrs"] = (q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr())
        seen["o"] = o
        return real_forward(q, k, v, o, *args)

    monkeypatch.setattr(module, "_forward", spy)
    qkv = torch.randn(1, 20, 3 * 2 * 72, device=device)
    with kernels.use_backend("triton"):
        out = kernels.attention_qkv(qkv, 2)
    element = qkv.element_size()
    assert seen["ptrs"][:3] == tuple(qkv.data_ptr() + i * 2 * 72 * element for i in range(3))
    assert seen["ptrs"][3] == out.data_ptr() and seen["o"].shape == (1, 2, 20, 72)


def test_non_contiguous_inputs(device):
    """q, k, v as (B, N, H, d) tensors transposed to (B, H, N, d), and a non-unit last stride."""
    q, k = (torch.randn(2, 33, 2, 64, device=device).transpose(1, 2).requires_grad_() for _ in range(2))
    v = torch.randn(2, 2, 33, 128, device=device)[..., ::2].requires_grad_()
    assert not q.is_contiguous() and v.stride(-1) == 2
    _compare(kernels.attention, [q, k, v], torch.float32)


def test_gradient_through_transposed_output(device):
    """SiT merges heads with o.transpose(1, 2).reshape(...): the incoming gradient is strided."""
    q, k, v = _qkv((1, 2, 30, 72), torch.float32, device)
    out = {}
    for backend in ("triton", "torch"):
        with kernels.use_backend(backend):
            o = kernels.attention(q, k, v)
        merged = o.transpose(1, 2).reshape(1, 30, 144)
        (merged * torch.linspace(-1, 1, 144, device=device)).sum().backward()
        out[backend] = grads([q, k, v])
    for a, b in zip(out["triton"], out["torch"]):
        assert_close(a, b, torch.float32)


def test_deterministic(device):
    qkv = leaf((2, 45, 3 * 2 * 72), torch.float32, device)
    g = torch.randn(2, 45, 2 * 72, device=device)
    runs = []
    for _ in range(2):
        with kernels.use_backend("triton"):
            o = kernels.attention_qkv(qkv, 2)
        o.backward(g)
        runs.append((o.detach(), *grads([qkv])))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_head_tiles_skip_padding():
    assert head_tiles(64) == (64, 0)
    assert head_tiles(72) == (64, 16)  # 80 columns computed, not 128
    assert head_tiles(96) == (64, 32)
    assert head_tiles(128) == (128, 0)
    assert head_tiles(40) == (32, 16)


def test_fp32_tiles_follow_torchs_tf32_flag(monkeypatch):
    """On a GPU, fp32 attention uses TF32 tensor cores exactly where PyTorch's own matmuls may
    (torch.backends.cuda.matmul.allow_tf32, which the trainer and the sampler set), with the launch
    table built for them; exact "ieee" otherwise, and always in the interpreter. (The conftest restores
    the flag.) The numbers of the TF32 path are checked on the GPU in test_gpu_real_sizes."""
    attention = importlib.import_module("kernels.attention")

    class OnGPU:
        is_cuda, dtype = True, torch.float32

    monkeypatch.setattr(attention, "interpreting", lambda: False)
    for flag, expected in ((True, "tf32"), (False, "ieee")):
        torch.backends.cuda.matmul.allow_tf32 = flag
        assert attention._dot_precision(OnGPU(), torch.float32) == expected
        assert attention._dot_precision(OnGPU(), torch.float64) == "ieee"
        assert attention._dot_precision(torch.zeros(1), torch.float32) == "ieee"  # not on a GPU
        table = "tf32" if flag else "fp32"
        assert attention._launch_config("dq", OnGPU(), {"PRECISION": expected})[:2] == \
            attention._GPU_CONFIGS[table]["dq"][:2]
    monkeypatch.setattr(attention, "interpreting", lambda: True)
    assert attention._dot_precision(OnGPU(), torch.float32) == "ieee"


def test_split_qkv_is_a_view():
    qkv = torch.randn(2, 5, 3 * 4 * 8)
    q, k, v = split_qkv(qkv, 4)
    assert q.shape == (2, 4, 5, 8) and q.data_ptr() == qkv.data_ptr()
    assert v[1, 2, 3, 4] == qkv[1, 3, 2 * 32 + 2 * 8 + 4]


def _timm_attention(dim, num_heads, device):
    from timm.layers import Attention

    attn = Attention(dim, num_heads, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm).to(device).double()
    attn.fused_attn = False
    with torch.no_grad():
        for norm in (attn.q_norm, attn.k_norm):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.3, 0.3)
    return attn


def test_reference_qk_norm_matches_timm(device):
    """The qk-norm reference is timm's Attention(qk_norm=True) as REPA uses it (LayerNorm, eps 1e-5)."""
    attn = _timm_attention(144, 2, device)
    x = torch.randn(2, 9, 144, device=device, dtype=torch.float64)
    o = kernels.reference_attention_qkv(attn.qkv(x), 2, q_norm_weight=attn.q_norm.weight,
                                        q_norm_bias=attn.q_norm.bias, k_norm_weight=attn.k_norm.weight,
                                        k_norm_bias=attn.k_norm.bias)
    torch.testing.assert_close(attn.proj(o), attn(x))


def _norm_leaves(head_dim, dtype, device):
    """q weight, q bias, k weight, k bias of an affine LayerNorm, away from the identity."""
    weights = [torch.rand(head_dim, dtype=torch.float64, device=device) + 0.5 for _ in range(2)]
    biases = [0.3 * torch.randn(head_dim, dtype=torch.float64, device=device) for _ in range(2)]
    return [x.to(dtype).requires_grad_() for x in (weights[0], biases[0], weights[1], biases[1])]


def _with_norms(fn, *args):
    def run(x, q_weight, q_bias, k_weight, k_bias, **kwargs):
        return fn(x, *args, q_norm_weight=q_weight, q_norm_bias=q_bias, k_norm_weight=k_weight,
                  k_norm_bias=k_bias, **kwargs)
    return run


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("head_dim,num_heads", [(72, 2), (64, 1), (128, 1)])
def test_qk_norm_packed(dtype, head_dim, num_heads, device):
    """Fused qk-norm: output and the gradients of qkv and of all four LayerNorm parameters. k's bias
    adds the same q . b_k to every score of a query row, so softmax ignores it: its gradient is
    exactly 0 and only rounding noise is compared."""
    qkv = (torch.randn(2, 37, 3 * num_heads * head_dim, device=device, dtype=torch.float64) * 2 + 0.5)
    qkv = qkv.to(dtype).requires_grad_()
    _compare(_with_norms(kernels.attention_qkv, num_heads), [qkv] + _norm_leaves(head_dim, dtype, device), dtype,
             zero_grads=(4,))


@pytest.mark.parametrize("head_dim", [72, 96])
def test_qk_norm_unpacked(head_dim, device):
    q, k, v = _qkv((1, 2, 40, head_dim), _exact(device), device)

    def fn(q, k, v, q_weight, q_bias, k_weight, k_bias, **kwargs):
        return kernels.attention(q, k, v, q_norm_weight=q_weight, q_norm_bias=q_bias, k_norm_weight=k_weight,
                                 k_norm_bias=k_bias, **kwargs)

    _compare(fn, [q, k, v] + _norm_leaves(head_dim, _exact(device), device), _exact(device), zero_grads=(6,),
             qk_norm_eps=1e-3)


def test_qk_norm_bf16(device):
    """bf16 activations with fp32 norm parameters (as under mixed precision)."""
    qkv = leaf((1, 33, 3 * 2 * 72), torch.bfloat16, device)
    _compare(_with_norms(kernels.attention_qkv, 2), [qkv] + _norm_leaves(72, torch.float32, device),
             torch.bfloat16, zero_grads=(4,))


def test_torch_backend_qk_norm_bf16_with_fp32_norms(monkeypatch, device):
    """The torch backend (test_qk_norm_bf16's reference) with bf16 activations and fp32 norm parameters
    normalises in fp32: CUDA's layer_norm refuses mixed dtypes ("expected scalar type BFloat16 but found
    Float", the H200 run of 2026-12-04), so here a layer_norm that refuses them as CUDA's does stands in
    for the CPU's, which takes them. Output and every gradient against the fp32 specification; k's bias
    gradient is exactly 0 in exact arithmetic (see test_qk_norm_packed), so only its noise is compared."""
    layer_norm = torch.nn.functional.layer_norm

    def refusing_mixed_dtypes(x, shape, weight=None, bias=None, eps=1e-5):
        for p in (weight, bias):
            if p is not None and p.dtype != x.dtype:
                raise RuntimeError(f"expected scalar type {x.dtype} but found {p.dtype}")
        return layer_norm(x, shape, weight, bias, eps)

    monkeypatch.setattr(torch.nn.functional, "layer_norm", refusing_mixed_dtypes)
    qkv = leaf((2, 33, 3 * 2 * 72), torch.bfloat16, device)
    inputs = [qkv] + _norm_leaves(72, torch.float32, device)
    g = torch.randn(2, 33, 2 * 72, dtype=torch.float64, device=device).to(torch.bfloat16)
    results = []
    for run in (lambda *x: _with_norms(kernels.attention_qkv, 2)(*x),
                lambda *x: _with_norms(kernels.reference_attention_qkv, 2)(*x)):
        with kernels.use_backend("torch"), poisoned_empty():
            out = run(*inputs)
        out.backward(g)
        results.append([out] + grads(inputs))
    actual, expected = results
    largest = max(float(x.abs().max()) for x in expected[1:])
    for i, name in enumerate(["o", "qkv", "q weight", "q bias", "k weight", "k bias"]):
        assert actual[i].dtype == expected[i].dtype == (torch.bfloat16 if i < 2 else torch.float32), name
        assert_close(actual[i], expected[i], torch.bfloat16, name=name, scale=max(1.0, largest) if i == 5 else None)


def test_qk_norm_matches_timm_block(device):
    """End to end against timm's Attention(qk_norm=True): attention_qkv on its qkv projection, its
    norms' parameters, then its output projection."""
    attn = _timm_attention(144, 2, device).to(_exact(device))
    x = torch.randn(2, 21, 144, device=device, dtype=_exact(device))
    with kernels.use_backend("triton"):
        o = kernels.attention_qkv(attn.qkv(x), 2, q_norm_weight=attn.q_norm.weight, q_norm_bias=attn.q_norm.bias,
                                  k_norm_weight=attn.k_norm.weight, k_norm_bias=attn.k_norm.bias)
    assert _ran_kernel(o)
    assert_close(attn.proj(o), attn(x), name="timm block output")


def test_partial_qk_norm_falls_back_with_reason(device, caplog):
    """A q weight alone (no bias, no k norm) is not what the fused kernel does: run the reference,
    say so, and never drop the norm."""
    qkv = torch.randn(1, 12, 3 * 2 * 16, device=device, dtype=torch.float64)
    weight = torch.rand(16, device=device, dtype=torch.float64) + 0.5
    reason = "the fused qk-norm needs all of q/k norm weight and bias (an affine LayerNorm)"
    with caplog.at_level(logging.WARNING, logger="kernels"), kernels.use_backend("triton"):
        _backend._logged.discard(("attention_qkv", reason))
        o = kernels.attention_qkv(qkv, 2, q_norm_weight=weight)
    assert reason in caplog.text
    torch.testing.assert_close(o, kernels.reference_attention_qkv(qkv, 2, q_norm_weight=weight))
    assert (o - kernels.reference_attention_qkv(qkv, 2)).abs().max() > 1e-3  # the norm was applied


def test_unsupported_head_dim_falls_back(device, caplog):
    q, k, v = (torch.randn(1, 2, 10, 8, device=device) for _ in range(3))
    with caplog.at_level(logging.WARNING, logger="kernels"), kernels.use_backend("triton"):
        _backend._logged.discard(("attention", "head dim 8 outside the kernel's 16..256"))
        o = kernels.attention(q, k, v)
    assert "head dim 8" in caplog.text
    torch.testing.assert_close(o, kernels.reference_attention(q, k, v))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_torch_backend_matches_the_reference(qk_norm, device):
    """The "torch" backend runs PyTorch's SDPA (the path the public code takes): same numbers as the
    reference within fp32 rounding, gradients included."""
    qkv = torch.randn(2, 7, 3 * 2 * 16, device=device, requires_grad=True)
    norms = {}
    if qk_norm:
        norms = dict(q_norm_weight=torch.randn(16, device=device), q_norm_bias=torch.randn(16, device=device),
                     k_norm_weight=torch.randn(16, device=device), k_norm_bias=torch.randn(16, device=device))
    with kernels.use_backend("torch"):
        out = kernels.attention_qkv(qkv, 2, **norms)
    expected = kernels.reference_attention_qkv(qkv, 2, **norms)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(out)
    grad, = torch.autograd.grad((out * weights).sum(), qkv)
    expected_grad, = torch.autograd.grad((expected * weights).sum(), qkv)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"one \(B, H, N, d\) shape"):
        kernels.attention(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 8, 16))
    with pytest.raises(ValueError, match="one dtype"):
        kernels.attention(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16).double(), torch.randn(1, 2, 8, 16))
    with pytest.raises(ValueError, match="not 3 \\* num_heads \\* head_dim"):
        kernels.attention_qkv(torch.randn(1, 8, 100), 3)
    with pytest.raises(ValueError, match=r"q_norm_weight must have shape \(16,\)"):
        kernels.attention_qkv(torch.randn(1, 8, 96), 2, q_norm_weight=torch.ones(32))
    with pytest.raises(TypeError, match="scale"):
        kernels.attention(*(torch.randn(1, 2, 8, 16) for _ in range(3)), scale=torch.tensor(0.5))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_very_negative_logsumexp_with_masked_tail(qk_norm, device):
    """Every score far below zero (lse around -1000 in base 2) and N below the tile: keys past N score
    0 in the backward, and exp2(0 - lse) overflows unless P itself is masked (it gave NaN in dq)."""
    N, H, d = 5, 2, 16
    q = -torch.ones(2, N, H, d, device=device) * 12
    k = torch.ones(2, N, H, d, device=device) * 12 + torch.randn(2, N, H, d, device=device)
    v = torch.randn(2, N, H, d, device=device)
    qkv = torch.stack([q, k, v], dim=2).reshape(2, N, 3 * H * d).requires_grad_()
    norms = {}
    if qk_norm:  # a large bias keeps the normalised scores extreme
        norms = dict(q_norm_weight=torch.ones(d, device=device), q_norm_bias=-8 * torch.ones(d, device=device),
                     k_norm_weight=torch.ones(d, device=device), k_norm_bias=8 * torch.ones(d, device=device))
    weights = torch.randn(2, N, H * d, device=device)
    with kernels.use_backend("triton"):
        out = kernels.attention_qkv(qkv, H, **norms)
    actual = (out,) + torch.autograd.grad((out * weights).sum(), qkv)
    # against fp64: the gradients reach ~1e3 here, so fp32 rounding is judged relative to that scale
    qkv64 = qkv.detach().double().requires_grad_()
    out64 = kernels.reference_attention_qkv(qkv64, H, **{k: w.double() for k, w in norms.items()})
    expected = (out64,) + torch.autograd.grad((out64 * weights.double()).sum(), qkv64)
    for a, e in zip(actual, expected):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), e, atol=1e-4 * max(1.0, float(e.abs().max())), rtol=1e-4)
