"""Benchmark cases for kernels.interpolant and kernels.velocity_loss (CAR-Flow per-channel shifts):
the reference eager and compiled, the Triton kernels, and the CUDA C++ kernels (csrc/interpolant.cu)
where they are built (a call that did not launch them fails rather than timing a fallback)."""
import torch

import kernels
from kernels import _cuda
from bench.common import BenchCase, Variant, backward_of, compiled


def _shape_cases(device, B, C, H, W, dtype, smoke, label, headline=False):
    numel, size = B * C * H * W, torch.finfo(dtype).bits // 8
    x = torch.randn(B, C, H, W, device=device, dtype=dtype)
    noise, v_pred = torch.randn_like(x), torch.randn_like(x).requires_grad_()
    t = torch.rand(B, device=device)
    mu0 = (0.1 * torch.randn(B, C, 1, 1, device=device, dtype=dtype)).requires_grad_()
    mu1 = (0.1 * torch.randn(B, C, 1, 1, device=device, dtype=dtype)).requires_grad_()
    shape = f"{B}x{C}x{H}x{W} {str(dtype)[6:]} {label}"

    def on(backend, fn):
        def run():
            with kernels.use_backend(backend):
                return fn()
        return run

    def interp_ref():
        return kernels.reference_interpolant(x, noise, t, "linear", mu0, mu1)

    def loss_ref():
        return kernels.reference_velocity_loss(v_pred, x, noise, t, "linear", mu0, mu1)

    interp_ours = on("triton", lambda: kernels.interpolant(x, noise, t, "linear", mu0, mu1))
    loss_ours = on("triton", lambda: kernels.velocity_loss(v_pred, x, noise, t, "linear", mu0, mu1))
    interp_cuda = on("cuda", lambda: kernels.interpolant(x, noise, t, "linear", mu0, mu1))
    loss_cuda = on("cuda", lambda: kernels.velocity_loss(v_pred, x, noise, t, "linear", mu0, mu1))
    cuda_reason = _cuda.unavailable("flow", device)

    def cuda_pass(forward, leaves, kind):
        """forward + backward, both under the "cuda" backend (the backward dispatches when it runs);
        fails unless both CUDA kernels launched."""
        run = on("cuda", backward_of(forward, leaves))
        return _cuda.launched(_cuda.launched(run, f"{kind}_forward"), f"{kind}_backward")
    interp_compiled, interp_reason = compiled(interp_ref, smoke)
    loss_compiled, loss_reason = compiled(loss_ref, smoke)
    leaves_i, leaves_l = [mu0, mu1], [v_pred, mu0, mu1]

    def fwd(fn):
        return lambda: (lambda: _no_grad(fn))

    return [
        BenchCase(
            "interpolant", shape,
            forward=[Variant("reference eager", fwd(interp_ref)),
                     Variant("reference compiled", fwd(interp_compiled), interp_reason),
                     Variant("triton", fwd(interp_ours)),
                     Variant("cuda C++", fwd(_cuda.launched(interp_cuda, "interpolant_forward")), cuda_reason)],
            forward_backward=[Variant("reference eager", lambda: backward_of(interp_ref, leaves_i)),
                              Variant("reference compiled", lambda: backward_of(interp_compiled, leaves_i), interp_reason),
                              Variant("triton", lambda: backward_of(interp_ours, leaves_i)),
                              Variant("cuda C++", lambda: cuda_pass(interp_cuda, leaves_i, "interpolant"),
                                      cuda_reason)],
            # forward reads x, noise and writes x_t, v; backward reads both output gradients
            bytes_forward=4 * numel * size, bytes_forward_backward=6 * numel * size,
            notes="per-sample per-channel shifts mu0, mu1 (B, C, 1, 1)", headline=headline),
        BenchCase(
            "velocity_loss", shape,
            forward=[Variant("reference eager", fwd(loss_ref)),
                     Variant("reference compiled", fwd(loss_compiled), loss_reason),
                     Variant("triton", fwd(loss_ours)),
                     Variant("cuda C++", fwd(_cuda.launched(loss_cuda, "velocity_forward")), cuda_reason)],
            forward_backward=[Variant("reference eager", lambda: backward_of(loss_ref, leaves_l)),
                              Variant("reference compiled", lambda: backward_of(loss_compiled, leaves_l), loss_reason),
                              Variant("triton", lambda: backward_of(loss_ours, leaves_l)),
                              Variant("cuda C++", lambda: cuda_pass(loss_cuda, leaves_l, "velocity"),
                                      cuda_reason)],
            # forward reads v_pred, x, noise; backward reads them again and writes d_v_pred
            bytes_forward=3 * numel * size, bytes_forward_backward=7 * numel * size,
            notes="gradients to v_pred and both shifts", headline=headline),
    ]


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def cases(device, smoke):
    if smoke:
        return _shape_cases(device, 2, 4, 8, 8, torch.float32, smoke, "smoke")
    return (_shape_cases(device, 32, 4, 32, 32, torch.bfloat16, smoke, "SiT-XL/2 256px", headline=True)
            + _shape_cases(device, 32, 4, 64, 64, torch.bfloat16, smoke, "512px"))
