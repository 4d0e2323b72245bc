"""Python-side cost of one eager call of each fused op's Triton path, with the kernel launches stubbed.

    TRITON_INTERPRET=1 python -m bench.wrapper_overhead [--repeats N]

Every `triton.jit` kernel of the kernel modules is replaced by a no-op, so what is timed is what the
wrapper adds around the launches on the host: backend resolution, argument checks, output and
scratch allocation, the autograd registration, and the backward's bookkeeping. The tensors are tiny
CPU tensors (the interpreter makes the Triton path eligible on the CPU); the launches themselves, and
anything on a GPU, are not measured. Prints the microseconds per forward call and per forward + backward call, the
best of several rounds (the least disturbed by other work on the machine).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_launches():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    import importlib

    # (kernels.attention etc. are the public functions; the modules are reached by their full names)
    for name in ("adaln", "alignment_loss", "attention", "gelu", "interpolant"):
        module = importlib.import_module(f"kernels.{name}")
        for name, value in vars(module).items():
            if isinstance(value, (JITFunction, InterpretedFunction)) and name.endswith("_kernel"):
                setattr(module, name, _NoLaunch())


def cases():
    import kernels

    B, N, D, H, d = 2, 16, 64, 2, 32
    x, h = torch.randn(B, N, D), torch.randn(B, N, D)
    gate, shift, scale = torch.randn(B, D), torch.randn(B, D), torch.randn(B, D)
    q, k, v = (torch.randn(B, H, N, d) for _ in range(3))
    qkv = torch.randn(B, N, 3 * H * d)
    lat, noise, t = torch.randn(B, 4, 4, 4), torch.randn(B, 4, 4, 4), torch.rand(B)
    mu0, mu1 = torch.randn(B, 4, 1, 1), torch.randn(B, 4, 1, 1)
    z_pred, z_enc = torch.randn(B, N, D), torch.randn(B, N, D)
    fc1_out, fc1_bias = torch.randn(B, N, 4 * D), torch.randn(4 * D)
    return t, {
        "adaln_modulate": (kernels.adaln_modulate, (x, shift, scale)),
        "adaln_residual_modulate": (lambda *a: kernels.adaln_residual_modulate(*a)[1], (x, h, gate, shift, scale)),
        "attention": (kernels.attention, (q, k, v)),
        "attention_qkv": (lambda a: kernels.attention_qkv(a, H), (qkv,)),
        "interpolant": (lambda *a: kernels.interpolant(*a, source_shift=mu0, target_shift=mu1)[1], (lat, noise, t)),
        "velocity_loss": (lambda v_pred, *a: kernels.velocity_loss(v_pred, *a, source_shift=mu0, target_shift=mu1),
                          (lat, lat, noise, t)),
        "alignment_loss": (kernels.alignment_loss, (z_pred, z_enc)),
        "gelu_tanh": (kernels.gelu_tanh, (fc1_out, fc1_bias)),
    }


def per_call_us(fn, repeats: int) -> float:
    for _ in range(max(repeats // 10, 10)):
        fn()
    start = time.process_time()  # CPU time of this process: other jobs on the machine add little
    for _ in range(repeats):
        fn()
    return (time.process_time() - start) / repeats * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    import kernels

    stub_launches()
    torch.set_num_threads(1)
    print(f"{'op':26s} {'forward us':>11s} {'fwd+bwd us':>11s}   (best of {args.rounds} rounds, launches stubbed)")
    with kernels.use_backend("triton"):
        t, table = cases()
        for name, (fn, inputs) in table.items():
            leaves = [x.detach().requires_grad_(x is not t) for x in inputs]  # the kernels give t no gradient

            def forward():
                with torch.no_grad():
                    fn(*leaves)

            def forward_backward():
                out = fn(*leaves)
                out.sum().backward()

            fwd = min(per_call_us(forward, args.repeats) for _ in range(args.rounds))
            both = min(per_call_us(forward_backward, args.repeats // 2) for _ in range(args.rounds))
            print(f"{name:26s} {fwd:11.1f} {both:11.1f}")


if __name__ == "__main__":
    main()
