"""optim.step_kernel "alignflow": ClippedAdamW running the CUDA C++ AdamW kernel (csrc/adamw.cu, in the
emulator on the CPU) against ClippedAdamW running torch's fused AdamW kernel, over a few steps with
fresh random gradients: params, moments and step counts, the bf16 copies, checkpoints moving between
the two kernels. (Under DeepSpeed ZeRO 1 and 2 on two ranks: test_optim_distributed.py.)"""
import copy

import pytest
import torch

from engine.optim import ClippedAdamW, clip_divisor
from kernels import _cuda
from tests.kernels import csrc_fixtures

csrc_build = csrc_fixtures.csrc_build  # autouse: the emulated build and ALIGNFLOW_CUEMU=1 (the GPU's fatbin on a GPU)

# group 0 takes bf16 gradients but for its last param, group 1 fp32 ones; awkward sizes (odd tails: the
# element kernel) and a tensor of two chunks. Every param but the first has a bf16 copy, so group 0
# takes three kernel calls (bf16 gradients without a copy, with copies, fp32 gradients) and group 1 one;
# without copies, two and one.
GROUPS = [dict(shapes=[(72, 5), (1152,), (1,), (4096 + 8,)], lr=1e-2, weight_decay=0.05, grad=torch.bfloat16),
          dict(shapes=[(3, 7, 2), (64,)], lr=3e-3, weight_decay=0.0, grad=torch.float32)]
CALLS_PER_STEP, CALLS_PER_STEP_WITHOUT_COPIES = 4, 3
ADAMW = dict(betas=(0.9, 0.95), eps=1e-8)
MAX_NORM = 0.5
# The two kernels compute the same update but round differently (torch's CPU kernel and ours do not
# evaluate it in the same order), and the moments carry the differences over the steps. An element's
# error is an ulp or so of the update's terms, which can be far larger than the element (a parameter
# or moment near 0), so it is measured against the largest |value| of that kind over all tensors:
# over 30 fresh seeds per divisor case, 5 steps, the largest |difference| was, in fp32 eps (1.2e-7)
# times that value, params 0.59, exp_avg 1.21, exp_avg_sq 1.91. The bounds are about twice that:
# rounding, where a wrong lr, beta, bias correction, decay or divisor misses by orders of magnitude.
ULPS = {"param": 2.0, "exp_avg": 4.0, "exp_avg_sq": 4.0}


def assert_close_in_ulps(pairs, key: str, what: str):
    scale = max(float(b.abs().max()) for _, b in pairs)
    bound = ULPS[key] * torch.finfo(torch.float32).eps * scale
    for i, (a, b) in enumerate(pairs):
        difference = float((a - b).abs().max())
        assert difference <= bound, f"{what} {key} {i} {tuple(b.shape)}: {difference:.3g} apart, allowed {bound:.3g}"


def make_params(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [[torch.nn.Parameter(torch.randn(s, generator=g)) for s in group["shapes"]] for group in GROUPS]


def make_grads(seed: int, steps: int, scale: float):
    """Per step, per group, the gradients (bf16 where the group takes bf16, bar the last param)."""
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(steps):
        step = []
        for group in GROUPS:
            grads = [(torch.randn(s, generator=g) * scale).to(group["grad"]) for s in group["shapes"]]
            grads[-1] = grads[-1].float()
            step.append(grads)
        out.append(step)
    return out


def make_optimizer(param_lists, step_kernel: str, copies=None):
    opt = ClippedAdamW([dict(params=ps, lr=group["lr"], weight_decay=group["weight_decay"])
                        for ps, group in zip(param_lists, GROUPS)], max_norm=MAX_NORM, step_kernel=step_kernel,
                       **ADAMW)
    opt.divisor_from_deepspeed = True  # the divisor is handed over, as ZeRO does: the same one for both kernels
    if copies is not None:
        opt.set_bf16_copies(copies)
    return opt


def divisor_of(grads):
    return clip_divisor(torch.nn.utils.get_total_norm([g.float() for gs in grads for g in gs], 2.0), MAX_NORM)


def take_step(opt, param_lists, grads, divisor_kind: str):
    """Set the gradients (fp32 copies of the bf16 ones for torch's kernel, which takes one dtype) and
    the divisor (of the fp32 gradients' norm), then step."""
    for ps, gs in zip(param_lists, grads):
        for p, g in zip(ps, gs):
            if opt.step_kernel == "torch":
                g = g.float()
            else:
                p.grad_dtype = None  # a bf16 gradient on an fp32 param, as DeepSpeed's bf16 partitions hold
            p.grad = g.clone()
    opt.set_clip_divisor(None if divisor_kind == "none" else divisor_of(grads))
    before = _cuda.launches["adamw_step"]
    opt.step()
    return _cuda.launches["adamw_step"] - before


def assert_same(opt_a, params_a, opt_b, params_b, what: str):
    pairs = list(zip(sum(params_a, []), sum(params_b, [])))
    assert_close_in_ulps([(a.detach(), b.detach()) for a, b in pairs], "param", what)
    for a, b in pairs:
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sa.keys() == sb.keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert sa["step"].dtype == sb["step"].dtype == torch.float32 and torch.equal(sa["step"], sb["step"])
    for key in ("exp_avg", "exp_avg_sq"):
        assert_close_in_ulps([(opt_a.state[a][key], opt_b.state[b][key]) for a, b in pairs], key, what)


@pytest.mark.parametrize("divisor_kind, grad_scale", [("clipped", 1.0), ("unclipped", 1e-3), ("none", 1.0)])
def test_alignflow_kernel_takes_torchs_steps(divisor_kind, grad_scale):
    seed = int(torch.randint(0, 2 ** 31, ()))
    steps = make_grads(seed, 5, grad_scale)
    runs = {}
    for kernel in ("torch", "alignflow"):
        ps = make_params(seed)
        copies = {p: torch.full(p.shape, float("nan"), dtype=torch.bfloat16) for p in ps[0][1:] + ps[1]}
        opt = make_optimizer(ps, kernel, copies)
        for i, grads in enumerate(steps):
            launched = take_step(opt, ps, grads, divisor_kind)
            assert launched == (CALLS_PER_STEP if kernel == "alignflow" else 0), _cuda._logged
            for j, (p, c) in enumerate(copies.items()):
                assert torch.equal(c, p.detach().to(torch.bfloat16)), f"{kernel} step {i} copy {j}"
        runs[kernel] = opt, ps
    start = make_params(seed)
    # every tensor moved (a one-element tensor only at all: its Adam steps on random-sign gradients can
    # cancel, as tests/engine/test_optim.py measured)
    assert all((p - s).abs().max() > (1e-3 if s.numel() > 1 else 0)
               for p, s in zip(sum(runs["alignflow"][1], []), sum(start, [])))
    divisors = torch.stack([divisor_of(grads) for grads in steps])
    if divisor_kind != "none":
        assert bool((divisors > 1).all() if divisor_kind == "clipped" else (divisors == 1).all()), divisors
    assert_same(*runs["torch"], *runs["alignflow"], divisor_kind)


@pytest.mark.parametrize("first, then", [("alignflow", "torch"), ("torch", "alignflow")])
def test_a_checkpoint_moves_between_the_kernels(first, then):
    """Two steps on one kernel, the state_dict into the other, three more: the uninterrupted run's
    result. The AlignFlow optimizer that loads it has stepped already (its host step counters must be
    re-read from the loaded state)."""
    seed = int(torch.randint(0, 2 ** 31, ()))
    steps = make_grads(seed, 5, 1.0)
    ps = make_params(seed)
    uninterrupted = make_optimizer(ps, "torch")
    for grads in steps:
        take_step(uninterrupted, ps, grads, "clipped")

    qs = make_params(seed)
    opt = make_optimizer(qs, first)
    for grads in steps[:2]:
        take_step(opt, qs, grads, "clipped")
    saved = copy.deepcopy(opt.state_dict())
    resumed = make_params(seed + 7)
    opt = make_optimizer(resumed, then)
    take_step(opt, resumed, steps[4], "clipped")  # a step of another run, overwritten by the load
    with torch.no_grad():
        for r, q in zip(sum(resumed, []), sum(qs, [])):
            r.copy_(q)
    opt.load_state_dict(saved)
    for grads in steps[2:]:
        launched = take_step(opt, resumed, grads, "clipped")
        assert launched == (CALLS_PER_STEP_WITHOUT_COPIES if then == "alignflow" else 0)
    assert_same(uninterrupted, ps, opt, resumed, f"{first} then {then}")


def test_without_the_emulator_the_reference_runs(monkeypatch):
    """On CPU tensors without ALIGNFLOW_CUEMU the AlignFlow step runs kernels.reference_adamw_step (no
    launch, the reason logged) and still takes torch's steps."""
    monkeypatch.delenv("ALIGNFLOW_CUEMU")
    seed = int(torch.randint(0, 2 ** 31, ()))
    steps = make_grads(seed, 2, 1.0)
    runs = []
    for kernel in ("torch", "alignflow"):
        ps = make_params(seed)
        opt = make_optimizer(ps, kernel)
        for grads in steps:
            assert take_step(opt, ps, grads, "clipped") == 0
        runs += [opt, ps]
    assert any(op == "adamw_step" and "ALIGNFLOW_CUEMU=1" in reason for op, reason in _cuda._logged), _cuda._logged
    assert_same(*runs, "reference")


def test_bad_arguments():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"step_kernel 'cutlass': allowed one of \('torch', 'alignflow'\)"):
        ClippedAdamW([p], max_norm=1.0, step_kernel="cutlass")
    with pytest.raises(ValueError, match=r"step_kernel 'alignflow' with amsgrad=True \(param group 0\)"):
        ClippedAdamW([p], max_norm=1.0, step_kernel="alignflow", amsgrad=True)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] is torch.bfloat16; allowed: float32"):
        ClippedAdamW([torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))], max_norm=1.0, step_kernel="alignflow")


def snapshot(opt, param_lists, copies):
    params = sum(param_lists, [])
    return ([p.detach().clone() for p in params], [{k: v.clone() for k, v in opt.state[p].items()} for p in params],
            [c.clone() for c in copies.values()])


def assert_bitwise(a, b, what: str):
    for kind, xs, ys in zip(("param", "state", "bf16 copy"), a, b):
        for i, (x, y) in enumerate(zip(xs, ys)):
            pairs = x.items() if isinstance(x, dict) else [("", x)]
            for key, value in pairs:
                other = y[key] if key else y
                assert torch.equal(value, other), f"{what}: {kind} {i} {key} differs"


def zero_optimizer_handing(opt):
    """A stand-in for DeepSpeed's ZeRO optimizer (its class name, loss scale and clip) whose
    unscale_and_clip_grads hand_clipping_to replaces."""
    from engine.optim import hand_clipping_to

    ds = type("DeepSpeedZeroOptimizer", (), dict(loss_scale=1.0, clip_grad=MAX_NORM, unscale_and_clip_grads=None))()
    hand_clipping_to(ds, opt)
    return ds


@pytest.mark.parametrize("kernel", ["torch", "alignflow"])
@pytest.mark.parametrize("bad", ["nan", "inf", "deepspeed -1", "own norm nan"])
def test_a_non_finite_gradient_skips_the_step(kernel, bad):
    """A NaN or inf in one gradient (or DeepSpeed's -1 sentinel for an invalid norm, or the
    optimizer's own norm of a NaN gradient): params, moments, step counts and bf16 copies bitwise as
    before; the steps after it bitwise those of a run that never saw it."""
    seed = int(torch.randint(0, 2 ** 31, ()))
    steps = make_grads(seed, 4, 1.0)
    runs = {}
    for run in ("clean", "skipping"):
        ps = make_params(seed)
        copies = {p: torch.full(p.shape, float("nan"), dtype=torch.bfloat16) for p in ps[0][1:] + ps[1]}
        opt = make_optimizer(ps, kernel, copies)
        ds = zero_optimizer_handing(opt) if bad == "deepspeed -1" else None
        opt.divisor_from_deepspeed = bad != "own norm nan"
        for i, grads in enumerate(steps):
            if run == "skipping" and i == 2:
                before = snapshot(opt, ps, copies)
                bad_grads = [[g.clone() for g in gs] for gs in steps[1]]
                bad_grads[1][0].view(-1)[3] = float("inf") if bad == "inf" else float("nan")
                for p_list, gs in zip(ps, bad_grads):
                    for p, g in zip(p_list, gs):
                        if kernel == "torch":
                            g = g.float()
                        else:
                            p.grad_dtype = None
                        p.grad = g
                if ds is not None:
                    ds.unscale_and_clip_grads(None, torch.tensor(-1.0))
                elif opt.divisor_from_deepspeed:
                    opt.set_clip_divisor(divisor_of(bad_grads))
                launched = _cuda.launches["adamw_step"]
                opt.step()
                assert _cuda.launches["adamw_step"] - launched == (CALLS_PER_STEP if kernel == "alignflow" else 0), \
                    _cuda._logged
                assert_bitwise(snapshot(opt, ps, copies), before, f"{kernel} {bad}: the skipped step")
            if opt.divisor_from_deepspeed:
                take_step(opt, ps, grads, "clipped")
            else:
                take_step(opt, ps, grads, "none")  # set_clip_divisor(None): the optimizer takes the norm
        runs[run] = snapshot(opt, ps, copies)
        assert all(float(opt.state[p]["step"]) == 4 for p in sum(ps, []))
    assert_bitwise(runs["skipping"], runs["clean"], f"{kernel} {bad}: the steps after the skipped one")
