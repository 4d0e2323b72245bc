"""Every CUDA C++ launcher of csrc/ once, forward and backward, at small awkward shapes in fp32 and bf16
(vector and element loads): the program `compute-sanitizer` runs on a GPU (bench/gpu_all.sh's
`sanitize` stage, memcheck, racecheck and synccheck), checked against the references so that a run that
launched nothing, or something wrong, fails.

    compute-sanitizer --tool memcheck --kernel-regex kns=alignflow python3 -m bench.csrc_sanitize
    ALIGNFLOW_CUEMU=1 python -m bench.csrc_sanitize     # the same on the CPU, in the emulator (CI)

On a GPU run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (the sanitize stage does): each tensor then has
its own allocation, so an access past its end is one memcheck sees rather than one inside the caching
allocator's block.
"""
from __future__ import annotations

import sys

import torch

import kernels
from kernels import _cuda


def _close(a, b, what, tol, scaled=False):
    """a against b; with `scaled`, the absolute tolerance relative to b's largest magnitude (at least 1)."""
    a, b = a.detach().float(), b.detach().float()
    atol = tol * max(1.0, float(b.abs().max())) if scaled else tol
    torch.testing.assert_close(a, b, atol=atol, rtol=tol, msg=lambda m: f"{what}: {m}")


def _grads(leaves):
    out = [None if t.grad is None else t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    return out


def _both(fn, leaves):
    """fn's outputs and the leaves' gradients, under the "cuda" backend and under the reference."""
    results = []
    for backend in ("cuda", "torch"):
        with kernels.use_backend(backend):
            outs = fn()
            outs = outs if isinstance(outs, tuple) else (outs,)
            torch.autograd.backward(list(outs), [torch.ones_like(o) for o in outs])
        results.append(list(outs) + _grads(leaves))
    return results


def run(device: torch.device) -> dict:
    torch.manual_seed(0)
    before = dict(_cuda.launches)
    for dtype in (torch.float32, torch.bfloat16):
        tol = 1e-4 if dtype == torch.float32 else 3e-2

        def leaf(*shape, scale=1.0):
            return (scale * torch.randn(shape, device=device)).to(dtype).requires_grad_()

        for B, N, D in ((2, 3, 72), (1, 5, 100), (2, 4, 1152)):  # vector, element loads, several warps
            x, h = leaf(B, N, D), leaf(B, N, D)
            gate, shift, scale = (leaf(B, D, scale=0.5) for _ in range(3))
            cuda, ref = _both(lambda: kernels.adaln_residual_modulate(x, h, gate, shift, scale), [x, h, gate, shift, scale])
            for a, b in zip(cuda, ref):
                _close(a, b, f"adaln_residual_modulate {dtype} {D}", tol, scaled=True)
            p, q = leaf(B, N, D), leaf(B, N, D)
            cuda, ref = _both(lambda: kernels.alignment_loss(p, q), [p, q])
            for a, b in zip(cuda, ref):
                _close(a, b, f"alignment_loss {dtype} {D}", tol)
        for shape in ((2, 4, 8, 8), (2, 3, 5, 7), (1, 4, 64, 64)):  # vector, element loads, two chunks
            x, noise, v_pred = leaf(*shape), leaf(*shape), leaf(*shape)
            t = torch.rand(shape[0], device=device)
            mu0, mu1 = leaf(shape[0], shape[1], 1, 1, scale=0.3), leaf(*shape, scale=0.3)
            cuda, ref = _both(lambda: kernels.interpolant(x, noise, t, "cosine", mu0, mu1), [x, noise, mu0, mu1])
            for a, b in zip(cuda, ref):
                _close(a, b, f"interpolant {dtype} {shape}", tol, scaled=True)
            cuda, ref = _both(lambda: kernels.velocity_loss(v_pred, x, noise, t, "linear", mu0, mu1),
                              [v_pred, x, noise, mu0, mu1])
            for a, b in zip(cuda, ref):
                _close(a, b, f"velocity_loss {dtype} {shape}", tol, scaled=True)
    params = [torch.randn(n, device=device) for n in (1, 7, 4096 + 12, 1152)]  # element and vector chunks
    for grad_dtype in (torch.float32, torch.bfloat16):
        ours, theirs = [p.clone() for p in params], [p.clone() for p in params]
        grads = [torch.randn_like(p).to(grad_dtype) for p in params]
        states = [[torch.zeros_like(p) for p in params] for _ in range(4)]
        copies = [torch.empty(p.shape, dtype=torch.bfloat16, device=device) for p in params]
        scale = torch.tensor([2.5], device=device)
        for backend, p, (m, v) in (("cuda", ours, states[:2]), ("torch", theirs, states[2:])):
            with kernels.use_backend(backend):
                kernels.adamw_step(p, grads, m, v, 3, lr=1e-3, weight_decay=0.05, grad_scale=scale,
                                   params_bf16=copies if backend == "cuda" else None)
        for a, b in zip(ours, theirs):
            _close(a, b, f"adamw_step {grad_dtype}", 1e-6)
    ran = {kind: _cuda.launches[kind] - before.get(kind, 0) for kind in _cuda.launches}
    expected = ("adaln_forward", "adaln_backward", "alignment_forward", "alignment_backward", "interpolant_forward",
                "interpolant_backward", "velocity_forward", "velocity_backward", "adamw_step")
    missing = [kind for kind in expected if not ran.get(kind)]
    if missing:
        raise RuntimeError(f"CUDA kernels that did not run: {missing} (fallbacks: {sorted(_cuda._logged)})")
    return ran


def main(argv=None) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ran = run(device)
    print(f"csrc launchers on {device}: " + ", ".join(f"{k} x{v}" for k, v in sorted(ran.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
