"""Every fused op at the SiT-XL/2 training shapes in bf16 on a GPU, against its reference (forward and
gradients). Skipped without CUDA: the CPU interpreter would take hours at these sizes."""
import pytest
import torch

import kernels
from tests.helpers import assert_close, grads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="real-size tests need a GPU")
B, T, D, H = 32, 256, 1152, 16  # SiT-XL/2 at 256 px, micro-batch 32


def _check(fn, inputs, leaves):
    torch.manual_seed(1)
    weights = None
    results = {}
    for backend in ("triton", "torch"):
        with kernels.use_backend(backend):
            out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        if weights is None:
            weights = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, weights)
        results[backend] = list(outs) + grads(leaves)
    for i, (actual, expected) in enumerate(zip(results["triton"], results["torch"])):
        assert torch.isfinite(actual).all(), f"output {i} has non-finite values"
        assert_close(actual, expected, torch.bfloat16, name=f"output {i}")


def _leaf(*shape, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).bfloat16().requires_grad_()


def test_interpolant_and_velocity_loss():
    x, noise = torch.randn(B, 4, 32, 32, device="cuda").bfloat16(), torch.randn(B, 4, 32, 32, device="cuda").bfloat16()
    t = torch.rand(B, device="cuda")
    mu0, mu1, v_pred = _leaf(B, 4, 1, 1, scale=0.1), _leaf(B, 4, 32, 32, scale=0.1), _leaf(B, 4, 32, 32)
    _check(lambda: kernels.interpolant(x, noise, t, "linear", mu0, mu1), (), [mu0, mu1])
    _check(lambda: kernels.velocity_loss(v_pred, x, noise, t, "cosine", mu0, mu1), (), [v_pred, mu0, mu1])


def test_alignment_loss():
    z_pred, z_target = _leaf(B, T, 768), torch.randn(B, T, 768, device="cuda").bfloat16()
    _check(lambda: kernels.alignment_loss(z_pred, z_target), (), [z_pred])


def test_adaln():
    x, h = _leaf(B, T, D), _leaf(B, T, D)
    gate, shift, scale = _leaf(B, D, scale=0.1), _leaf(B, D, scale=0.1), _leaf(B, D, scale=0.1)
    _check(lambda: kernels.adaln_modulate(x, shift, scale), (), [x, shift, scale])
    _check(lambda: kernels.adaln_residual_modulate(x, h, gate, shift, scale), (), [x, h, gate, shift, scale])


@pytest.mark.parametrize("N, num_heads, head_dim", [(256, 16, 72), (257, 16, 72), (1024, 16, 72), (256, 12, 64)])
def test_attention_qkv(N, num_heads, head_dim):
    qkv = _leaf(B, N, 3 * num_heads * head_dim)
    _check(lambda: kernels.attention_qkv(qkv, num_heads), (), [qkv])
