"""The CUDA C++ multi-tensor AdamW step (csrc/adamw.cu) against torch.optim.AdamW over several steps,
run on the CPU by the CUDA emulator (kernels.set_backend("cuda") with ALIGNFLOW_CUEMU=1); on a GPU the
real kernel, from the fatbin shared object."""

import pytest
import torch

import kernels
from kernels import _cuda
from tests.kernels.csrc_fixtures import csrc_build, run_under_asan  # noqa: F401 (csrc_build: autouse)

# a 1-element tensor, an odd size (element kernel), exactly one chunk, a chunk and a tail, an
# unaligned view (element kernel), a weight matrix
SIZES = [(1,), (7,), (4096,), (4096 + 12,), (3, 5), (64, 72)]


def _params(device):
    params = [torch.randn(size, device=device) for size in SIZES]
    params.append(torch.randn(33, device=device)[1:])  # 32 elements at a 4-byte offset: not 16-byte aligned
    return params


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay,scaled", [(0.0, False), (0.05, True)])
def test_matches_torch_adamw(grad_dtype, weight_decay, scaled, device):
    """Five steps (bias correction changes every step) against torch.optim.AdamW on the same gradients
    (bf16 ones upcast: exact), with a grad_scale divisor (engine.optim's clip) and the bf16 copy."""
    torch.manual_seed(0)
    ours = _params(device)
    theirs = [p.clone().requires_grad_() for p in ours]
    reference = torch.optim.AdamW(theirs, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay,
                                  foreach=False)
    m = [torch.zeros_like(p) for p in ours]
    v = [torch.zeros_like(p) for p in ours]
    copies = [torch.full(p.shape, float("nan"), dtype=torch.bfloat16, device=device) for p in ours]
    for step in range(1, 6):
        grads = [torch.randn(p.shape, device=device).to(grad_dtype) for p in ours]
        scale = torch.tensor([1.7 + step], device=device) if scaled else None
        before = _cuda.launches["adamw_step"]
        with kernels.use_backend("cuda"):
            kernels.adamw_step(ours, grads, m, v, step, lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                               weight_decay=weight_decay, grad_scale=scale, params_bf16=copies)
        assert _cuda.launches["adamw_step"] == before + 1, _cuda._logged
        for p, g in zip(theirs, grads):
            p.grad = g.float() / scale if scaled else g.float()
        reference.step()
        for i, (a, b) in enumerate(zip(ours, theirs)):
            torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=1e-6, msg=lambda s: f"step {step} param {i}: {s}")
            torch.testing.assert_close(m[i], reference.state[b]["exp_avg"], atol=1e-7, rtol=1e-6)
            torch.testing.assert_close(v[i], reference.state[b]["exp_avg_sq"], atol=1e-9, rtol=1e-6)
            assert torch.equal(copies[i], a.to(torch.bfloat16)), f"bf16 copy of param {i}"


def test_steps_over_the_same_tensors_build_their_chunk_tables_once(device):
    """The chunk tables are cached by every address and size: three steps over the same tensors build
    them once and step exactly as torch.optim.AdamW; a gradient at a new address (or a bf16 copy list
    added) builds new ones, and the steps stay exact."""
    torch.manual_seed(0)
    ours = _params(device)
    theirs = [p.clone().requires_grad_() for p in ours]
    reference = torch.optim.AdamW(theirs, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, foreach=False)
    m, v = [torch.zeros_like(p) for p in ours], [torch.zeros_like(p) for p in ours]
    grads = [torch.full(p.shape, float("nan"), device=device) for p in ours]
    copies = None
    builds = _cuda.adamw_table_builds[device.type]
    for step, new_tables in ((1, 1), (2, 0), (3, 0), (4, 1), (5, 1), (6, 0)):
        if step == 4:  # one gradient moves to a new tensor
            keep = grads[2]
            grads[2] = torch.empty_like(keep)
        if step == 5:
            copies = [torch.full(p.shape, float("nan"), dtype=torch.bfloat16, device=device) for p in ours]
        for g in grads:
            g.copy_(torch.randn(g.shape, device=device))
        with kernels.use_backend("cuda"):
            kernels.adamw_step(ours, grads, m, v, step, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, params_bf16=copies)
        assert _cuda.adamw_table_builds[device.type] == builds + new_tables, f"step {step}"
        builds += new_tables
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        reference.step()
        for i, (a, b) in enumerate(zip(ours, theirs)):
            torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=1e-6, msg=lambda s: f"step {step} param {i}: {s}")
            torch.testing.assert_close(v[i], reference.state[b]["exp_avg_sq"], atol=1e-9, rtol=1e-6)
            if copies is not None:
                assert torch.equal(copies[i], a.to(torch.bfloat16)), f"step {step}: bf16 copy of param {i}"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_a_non_finite_grad_scale_writes_nothing(bad, grad_dtype, device):
    """A non-finite divisor (engine.optim's for a non-finite gradient norm) skips the step: params,
    moments and bf16 copies bitwise as they were, in the kernel and in the reference alike."""
    torch.manual_seed(0)
    params = _params(device)
    m = [torch.randn_like(p).abs() for p in params]
    v = [torch.randn_like(p).abs() for p in params]
    copies = [torch.randn(p.shape, device=device).to(torch.bfloat16) for p in params]
    grads = [torch.randn(p.shape, device=device).to(grad_dtype) for p in params]
    before = [[t.clone() for t in ts] for ts in (params, m, v, copies)]
    for backend in ("cuda", "torch"):
        launched = _cuda.launches["adamw_step"]
        with kernels.use_backend(backend):
            kernels.adamw_step(params, grads, m, v, 3, lr=1e-3, weight_decay=0.05,
                               grad_scale=torch.tensor([bad], device=device), params_bf16=copies)
        assert _cuda.launches["adamw_step"] == launched + (backend == "cuda"), _cuda._logged
        for name, ts, old in zip(("param", "exp_avg", "exp_avg_sq", "bf16 copy"), (params, m, v, copies), before):
            for i, (t, o) in enumerate(zip(ts, old)):
                assert torch.equal(t, o), f"{backend}: {name} {i} written"
    kernels.adamw_step(params, grads, m, v, 3, lr=1e-3, grad_scale=torch.tensor([2.0], device=device))
    assert not torch.equal(params[-1], before[0][-1])  # a finite divisor steps


def test_chunk_tables_split_vector_and_element_chunks():
    """Aligned chunks whose length is a multiple of the vector go to the 128-bit kernel, the rest
    (odd tails, an unaligned view) to the element kernel; every chunk exactly once."""
    params = [torch.zeros(4096 * 2 + 6), torch.zeros(8), torch.zeros(9)[1:]]
    table, pairs, num_vector = _cuda.adamw_tables(params, params, params, params, None, 4096, 4)
    assert table[:, 5].tolist() == [8198, 8, 8]
    assert pairs[:num_vector].tolist() == [[0, 0], [0, 1], [1, 0]]
    assert pairs[num_vector:].tolist() == [[0, 2], [2, 0]]


def test_other_backends_run_the_reference(device, caplog):
    p, g = [torch.randn(10, device=device)], [torch.randn(10, device=device)]
    m, v = [torch.zeros(10, device=device)], [torch.zeros(10, device=device)]
    expected = [t.clone() for t in (p[0], m[0], v[0])]
    kernels.reference_adamw_step([expected[0]], g, [expected[1]], [expected[2]], 1, lr=0.1)
    with kernels.use_backend("torch"), caplog.at_level("WARNING", logger="kernels"):
        kernels.adamw_step(p, g, m, v, 1, lr=0.1)
    assert torch.equal(p[0], expected[0]) and torch.equal(v[0], expected[2])
    with pytest.raises(ValueError, match=r"adamw_step step 0: allowed an int >= 1"):
        kernels.adamw_step(p, g, m, v, 0, lr=0.1)


def test_address_sanitizer_run():
    """Steps over every chunk kind (a 1-element tensor, odd tails, an unaligned view, bf16 grads and
    copies) in an AddressSanitizer build of the emulated kernel: any out-of-bounds access fails."""
    import textwrap

    if _cuda.emulator_missing():
        pytest.skip(_cuda.emulator_missing())
    script = textwrap.dedent("""
        import torch, kernels
        from kernels import _cuda
        kernels.set_backend("cuda")
        params = [torch.randn(n) for n in (1, 7, 4096 + 12)] + [torch.randn(33)[1:]]
        for dtype in (torch.float32, torch.bfloat16):
            grads = [torch.randn(p.shape).to(dtype) for p in params]
            m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
            copies = [torch.empty(p.shape, dtype=torch.bfloat16) for p in params]
            kernels.adamw_step(params, grads, m, v, 1, lr=1e-3, grad_scale=torch.tensor([2.0]), params_bf16=copies)
        assert _cuda.launches["adamw_step"] == 2, _cuda.launches
        print("ok")
    """)
    run_under_asan(script, "adamw")
