"""The fused ops under torch.compile: custom ops keep the graph whole (fullgraph=True) and give the
eager kernels' numbers; torch.library.opcheck validates their registrations."""
import importlib

import pytest
import torch

import kernels

# the package's `interpolant` and `alignment_loss` attributes are the functions, not the modules
interpolant_module = importlib.import_module("kernels.interpolant")
alignment_module = importlib.import_module("kernels.alignment_loss")
adaln_module = importlib.import_module("kernels.adaln")
attention_module = importlib.import_module("kernels.attention")


def _step(v_pred, x, noise, t, mu0, mu1, z_pred, z_target, h, modulation, bias):
    x_t, _ = kernels.interpolant(x, noise, t, "linear", mu0, mu1)
    loss = kernels.velocity_loss(v_pred, x, noise, t, "linear", mu0, mu1)
    gate, shift, scale = modulation.chunk(3, dim=1)
    x_new, y = kernels.adaln_residual_modulate(z_pred, h, gate, shift, scale)
    x_new, y = kernels.adaln_residual_modulate(x_new, y, gate, shift, scale, bias=bias)
    y2 = kernels.adaln_modulate(y, shift, scale)
    y2 = y2 + kernels.attention_qkv(torch.cat([y2, y, x_new], dim=-1), num_heads=2)
    return (loss + 0.5 * kernels.alignment_loss(z_pred, z_target) + x_t.square().mean()
            + (x_new * y2).mean())


def test_compiled_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    shape = (2, 4, 8, 8)
    inputs = dict(v_pred=torch.randn(shape, device=device, requires_grad=True), x=torch.randn(shape, device=device),
                  noise=torch.randn(shape, device=device), t=torch.rand(2, device=device),
                  mu0=torch.randn(2, 4, 1, 1, device=device, requires_grad=True),
                  mu1=torch.randn(shape, device=device, requires_grad=True),
                  z_pred=torch.randn(2, 5, 72, device=device, requires_grad=True),
                  z_target=torch.randn(2, 5, 72, device=device),
                  h=torch.randn(2, 5, 72, device=device, requires_grad=True),
                  modulation=torch.randn(2, 3 * 72, device=device, requires_grad=True),
                  bias=torch.randn(72, device=device, requires_grad=True))
    leaves = [v for v in inputs.values() if v.requires_grad]
    results = []
    with kernels.use_backend("triton"):
        for fn in (_step, torch.compile(_step, fullgraph=True)):
            loss = fn(**inputs)
            grads = torch.autograd.grad(loss, leaves)
            results.append((loss, grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case", ["interpolant", "velocity_loss", "alignment", "adaln", "adaln_residual",
                                  "adaln_residual_bias", "attention", "attention_qkv_norm"])
def test_opcheck(case, device):
    shape = (2, 3, 4, 4)
    x, noise = torch.randn(shape, device=device), torch.randn(shape, device=device)
    t = torch.rand(2, device=device)
    mu0 = torch.randn(2, 3, 1, 1, device=device, requires_grad=True)
    mu1 = torch.randn(shape, device=device, requires_grad=True)
    if case == "interpolant":
        torch.library.opcheck(interpolant_module._interpolant.op, (x, noise, t, mu0, mu1, "cosine"))
    elif case == "velocity_loss":
        v_pred = torch.randn(shape, device=device, requires_grad=True)
        torch.library.opcheck(interpolant_module._velocity_loss.op, (v_pred, x, noise, t, mu0, mu1, "linear"))
    elif case == "alignment":
        p = torch.randn(2, 5, 40, device=device, requires_grad=True)
        torch.library.opcheck(alignment_module._alignment_cos.op, (p, torch.randn(2, 5, 40, device=device)))
    elif case == "attention":
        q, k, v = (torch.randn(2, 2, 9, 16, device=device, requires_grad=True) for _ in range(3))
        torch.library.opcheck(attention_module._attention.op, (q, k, v, 0.25, None, None, None, None, 1e-5))
    elif case == "attention_qkv_norm":
        qkv = torch.randn(2, 9, 3 * 2 * 16, device=device, requires_grad=True)
        norms = [torch.randn(16, device=device, requires_grad=True) for _ in range(4)]
        torch.library.opcheck(attention_module._attention_qkv.op, (qkv, 2, 0.25, *norms, 1e-5))
    else:
        tokens = torch.randn(2, 5, 40, device=device, requires_grad=True)
        gate, shift, scale = (torch.randn(2, 40, device=device, requires_grad=True) for _ in range(3))
        if case == "adaln":
            torch.library.opcheck(adaln_module._adaln_modulate.op, (tokens, shift, scale, 1e-6))
        else:
            h = torch.randn(2, 5, 40, device=device, requires_grad=True)
            bias = torch.randn(40, device=device, requires_grad=True) if case == "adaln_residual_bias" else None
            torch.library.opcheck(adaln_module._adaln_residual_modulate.op,
                                  (tokens, h, gate, shift, scale, bias, 1e-6))
