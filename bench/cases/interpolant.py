"""Benchmark cases for kernels.interpolant and kernels.velocity_loss (CAR-Flow per-channel shifts):
the reference eager and compiled, the Triton kernels, and the CUDA C++ kernels (csrc/interpolant.cu)
where they are built (a call that did not launch them fails rather than timing a fallback)."""
import torch

import kernels
from kernels import _cuda
from bench.common import BenchCase, Variant, backward_of, compiled, forward_only


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

    cuda_reason = _cuda.unavailable("flow", device)

    def case(name, reference, op, leaves, kind, bytes_forward, bytes_forward_backward, notes):
        """The op's reference eager and compiled, Triton and CUDA C++ variants; a CUDA C++ pass fails
        unless its `kind`_forward (and, with the backward, `kind`_backward) kernel launched."""
        ours, cuda = on("triton", op), on("cuda", op)
        reference_compiled, reason = compiled(reference, smoke)

        def cuda_pass():  # forward + backward, both under the "cuda" backend (the backward dispatches when it runs)
            run = on("cuda", backward_of(op, leaves))
            return _cuda.launched(_cuda.launched(run, f"{kind}_forward"), f"{kind}_backward")
        return BenchCase(
            name, shape,
            forward=[Variant("reference eager", forward_only(reference)),
                     Variant("reference compiled", forward_only(reference_compiled), reason),
                     Variant("triton", forward_only(ours)),
                     Variant("cuda C++", forward_only(_cuda.launched(cuda, f"{kind}_forward")), cuda_reason)],
            forward_backward=[Variant("reference eager", lambda: backward_of(reference, leaves)),
                              Variant("reference compiled", lambda: backward_of(reference_compiled, leaves), reason),
                              Variant("triton", lambda: backward_of(ours, leaves)),
                              Variant("cuda C++", cuda_pass, cuda_reason)],
            bytes_forward=bytes_forward, bytes_forward_backward=bytes_forward_backward, notes=notes,
            headline=headline)

    return [
        # forward reads x, noise and writes x_t, v; backward reads both output gradients
        case("interpolant", interp_ref, lambda: kernels.interpolant(x, noise, t, "linear", mu0, mu1), [mu0, mu1],
             "interpolant", 4 * numel * size, 6 * numel * size, "per-sample per-channel shifts mu0, mu1 (B, C, 1, 1)"),
        # forward reads v_pred, x, noise; backward reads them again and writes d_v_pred
        case("velocity_loss", loss_ref, lambda: kernels.velocity_loss(v_pred, x, noise, t, "linear", mu0, mu1),
             [v_pred, mu0, mu1], "velocity", 3 * numel * size, 7 * numel * size,
             "gradients to v_pred and both shifts"),
    ]


def cases(device, smoke):
    if smoke:
        return _shape_cases(device, 2, 4, 8, 8, torch.float32, smoke, "smoke")
    return (_shape_cases(device, 32, 4, 32, 32, torch.bfloat16, smoke, "SiT-XL/2 256px", headline=True)
            + _shape_cases(device, 32, 4, 64, 64, torch.bfloat16, smoke, "512px"))
