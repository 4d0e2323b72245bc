"""AdamW with the gradient clipping folded into its step (`optim.fused_clip`).

The reference path clips in two passes over the gradients before AdamW reads them a third time:
`clip_grad_norm_` reads them for the global norm, then scales them in place (a read and a write).
`ClippedAdamW` reads them once for the norm and hands the clip divisor to torch's fused AdamW kernel
as its `grad_scale` (the tensor GradScaler uses to unscale inside the kernel): the update divides each
gradient by it as it reads it, so the in-place scaling pass is gone. torch's kernel writes the divided
gradient back to `.grad` when given a `grad_scale` (GradScaler's contract, torch 2.0 to 2.14 at least),
so the step moves 4 bytes less per fp32 parameter than the reference (norm 4 + scale 8 + AdamW 28 ->
norm 4 + AdamW 32), and launches one multi-tensor pass less.

Under DeepSpeed the norm is DeepSpeed's own (ZeRO's partitioned flat gradients, reduced over the
data-parallel group, the norm the trainer logs): `hand_clipping_to` replaces the ZeRO optimizer's
in-place `unscale_and_clip_grads` by one that passes DeepSpeed's combined divisor (loss scale times
clip factor) to this optimizer's next step. Without ZeRO (stage 0) the optimizer takes the norm
itself, over the full gradients that DeepSpeed has already averaged.

Non-finite gradients: a non-finite norm (or DeepSpeed's -1 sentinel for one) gives a non-finite
divisor, and a non-finite divisor skips the step on the device, with no host sync: params, moments,
bf16 copies and state['step'] stay as they were, and the next step is taken as if the skipped one
never happened. torch's kernel takes `found_inf` (1 where the divisor is not finite) as GradScaler
hands it; the AlignFlow kernel returns before writing when *grad_scale is not finite. So DeepSpeed's
own bf16 overflow check (13 kernels per gradient and a host sync) is redundant with this optimizer:
engine.config turns it off (bf16.check_grad_overflow) where optim.fused_clip is on.

Numerics: the clip is applied as g / d instead of g * (1 / d) (DeepSpeed) or g * (c / (norm + 1e-6))
(torch), so a clipped step differs from the reference by float rounding of the gradient (one ulp);
an unclipped step (d = 1) is the same.

bf16 weight copies (`set_bf16_copies`): a bf16 forward that reads a bf16 copy of each fp32 parameter
hands the optimizer {fp32 param: bf16 tensor}; after every step() each copy holds its parameter
rounded to bf16 (round to nearest even, as `param.to(torch.bfloat16)`), so the model casts nothing per
step. torch's kernel path writes them in one `torch._foreach_copy_` after its step; the AlignFlow
kernel writes them in its own pass. `write_bf16_copies()` rewrites them all (after the fp32 params
were changed outside step(), e.g. loaded from a checkpoint).

The step kernel (`step_kernel`, optim.step_kernel): "torch" runs torch's fused AdamW kernel, "alignflow"
the CUDA C++ multi-tensor kernel of csrc/adamw.cu (`kernels.adamw_step`, one call per param group and
gradient dtype; fp32 params, fp32 or bf16 gradients), under the "cuda" kernels backend for that call
only: on CUDA tensors the built kernel, on CPU tensors the emulator with ALIGNFLOW_CUEMU=1, otherwise
`kernels.reference_adamw_step` (kernels logs why, once). Both keep torch AdamW's state ({'step': fp32
scalar tensor, 'exp_avg', 'exp_avg_sq'} per param), so checkpoints load into either and a run may
switch kernels between resumes. The AlignFlow kernel takes the step count as a host int: a host
counter per param, read from state['step'] once (again whenever that tensor is replaced, as by
load_state_dict), while the device step tensors advance with one `torch._foreach_add_` as torch's do
(by isfinite(divisor): 0 for a skipped step). Whether a step with a divisor was skipped reaches the
host counters late, without a sync: the flag is copied to pinned host memory after the step and read
at the next step, after that copy's event (by then long complete: the trainer reads the gradient norm,
a host sync, after every step).
bf16 weight gradients (`set_gradient_source`, train.bf16_weight_grads; step_kernel "alignflow" only): a
source (engine.bf16_copies.WeightCopies with grads) supplies {fp32 param: bf16 gradient} for the params
whose bf16 copies took the matmuls' gradients in the backward instead of their `.grad` (no fp32
gradient is made for them). The norm reads them in bf16 and sums in fp32 (`total_norm`), the kernel
reads them in bf16 and upcasts them exactly, and step() (and zero_grad()) drops them after.
Unlike torch's kernel it leaves `.grad` undivided. Nothing reads `.grad` after the step in either path:
DeepSpeed ZeRO 1/2 and 3 set the flat fp32 partition's `.grad` to None right after the optimizer step
(stage_1_and_2.py `step`, stage3.py `_release_sub_group`), and without ZeRO the engine zeroes the
gradients after it (`_take_model_step`); the trainer reads none.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Protocol

import torch

STEP_KERNELS = ("torch", "alignflow")
CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_ and DeepSpeed: the norm plus this, over max_norm


def clip_divisor(total_norm: torch.Tensor, max_norm: float, loss_scale: float = 1.0) -> torch.Tensor:
    """What the gradients are divided by: loss_scale x max(1, (norm / loss_scale + 1e-6) / max_norm),
    DeepSpeed's `combined_scale` (the norm is of the loss-scaled gradients); a non-finite norm gives a
    non-finite divisor, as the reference's coefficient is then non-finite too."""
    clip = ((total_norm.float() / loss_scale) + CLIP_EPS) / max_norm
    return torch.clamp(clip, min=1.0) * loss_scale


class GradientSource(Protocol):
    """Where params' gradients live when not in `.grad` (engine.bf16_copies.WeightCopies with grads)."""

    def gradients(self) -> dict[torch.Tensor, torch.Tensor]: ...

    def clear_gradients(self) -> None: ...


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global 2-norm of `grads` as torch.nn.utils.get_total_norm takes it (each tensor's norm, in
    their order, then the norm of those), each tensor's norm summed in fp32 whatever its dtype: bf16
    gradients are read as they are, with no fp32 copy made."""
    if all(g.dtype == torch.float32 for g in grads):
        return torch.nn.utils.get_total_norm(grads, 2.0)
    norms: list[torch.Tensor | None] = [None] * len(grads)
    by_dtype = defaultdict(list)
    for i, g in enumerate(grads):
        by_dtype[g.dtype].append(i)
    for indices in by_dtype.values():
        for i, norm in zip(indices, torch._foreach_norm([grads[i] for i in indices], 2.0, dtype=torch.float32)):
            norms[i] = norm
    return torch.linalg.vector_norm(torch.stack(norms), 2.0)


class ClippedAdamW(torch.optim.AdamW):
    """torch's fused AdamW that clips the global gradient norm to `max_norm` inside its kernel.

    `step()` takes the divisor DeepSpeed handed over (`set_clip_divisor`, once per step), else the
    global norm of its own gradients (`grad_norm_source`, where given, supplies an already computed
    norm instead). The norm it used is `last_grad_norm` (a device tensor; None when DeepSpeed
    supplied the divisor: DeepSpeed keeps the norm) and, for DeepSpeed's stage-0 engine, which reads
    it from its optimizer, `_global_grad_norm`.

    `set_bf16_copies({param: bf16 tensor})` (None: none) makes every step() also leave each copy equal
    to its parameter rounded to bf16; `writes_bf16_copies` says whether it does. `set_gradient_source`
    (step_kernel "alignflow") takes params' bf16 gradients from a GradientSource instead of `.grad`.

    `step_kernel` "torch" (torch's fused AdamW) or "alignflow" (csrc/adamw.cu; fp32 params, no
    amsgrad, maximize, capturable or differentiable): see the module docstring."""

    def __init__(self, params, max_norm: float, grad_norm_source: Callable[[], torch.Tensor] | None = None,
                 step_kernel: str = "torch", **adamw_kwargs):
        if adamw_kwargs.pop("fused", True) is False:
            raise ValueError("ClippedAdamW runs torch's fused AdamW kernel only (fused=False asked for)")
        if adamw_kwargs.get("foreach"):
            raise ValueError("ClippedAdamW runs torch's fused AdamW kernel, not the foreach one")
        if step_kernel not in STEP_KERNELS:
            raise ValueError(f"ClippedAdamW step_kernel {step_kernel!r}: allowed one of {STEP_KERNELS}")
        super().__init__(params, fused=True, **adamw_kwargs)
        if not max_norm > 0:
            raise ValueError(f"ClippedAdamW max_norm {max_norm!r}: allowed a number > 0")
        self.step_kernel = step_kernel
        self._host_steps: dict[torch.Tensor, tuple[torch.Tensor, int]] = {}  # param: (its state's step tensor, value)
        self._pending_finite = None  # (params, host flag, event or None) of the last step with a divisor
        if step_kernel == "alignflow":
            self._check_alignflow_groups()
        self.max_norm = float(max_norm)
        self.grad_norm_source = grad_norm_source
        self.last_grad_norm: torch.Tensor | None = None
        self._clip_divisor: torch.Tensor | None = None
        self.divisor_from_deepspeed = False  # set by hand_clipping_to for a ZeRO optimizer
        self._bf16_copies: dict[torch.Tensor, torch.Tensor] = {}
        self._gradient_source: GradientSource | None = None

    clips_gradients = True  # bench.train_step.one_step: no clip_grad_norm_ before this optimizer

    def set_clip_divisor(self, divisor: torch.Tensor | None) -> None:
        """DeepSpeed's divisor for the next step() (None: do not scale)."""
        self._clip_divisor = divisor

    @property
    def writes_bf16_copies(self) -> bool:
        return bool(self._bf16_copies)

    def set_bf16_copies(self, mapping: dict[torch.Tensor, torch.Tensor] | None) -> None:
        """{fp32 param of this optimizer: bf16 tensor of its shape} that every step() leaves equal to
        the param rounded to bf16 (written now too); None or {} stops it. Raises ValueError naming a
        param that is not this optimizer's or a copy of the wrong shape, dtype or device."""
        mapping = dict(mapping or {})
        names = {p: f"param_groups[{i}]['params'][{j}]" for i, group in enumerate(self.param_groups)
                 for j, p in enumerate(group["params"])}
        for param, copy in mapping.items():
            if param not in names:
                raise ValueError(f"set_bf16_copies: a param of shape {tuple(param.shape)} ({param.dtype}) that this "
                                 "optimizer does not hold; allowed: its param_groups' params")
            if param.dtype != torch.float32:
                raise ValueError(f"set_bf16_copies: {names[param]} is {param.dtype}; allowed: float32 params")
            if not (torch.is_tensor(copy) and copy.dtype == torch.bfloat16 and copy.shape == param.shape
                    and copy.device == param.device):
                got = f"{copy.dtype} {tuple(copy.shape)} on {copy.device}" if torch.is_tensor(copy) else type(copy).__name__
                raise ValueError(f"set_bf16_copies: the copy of {names[param]} is {got}; allowed: torch.bfloat16 "
                                 f"{tuple(param.shape)} on {param.device}")
        self._bf16_copies = mapping
        self.write_bf16_copies()

    def set_gradient_source(self, source: GradientSource | None) -> None:
        """Take the gradients of the params that `source.gradients()` names from it (bf16) rather than from
        `.grad`, and drop them (`source.clear_gradients()`) after each step; None: `.grad` only. Raises
        ValueError unless step_kernel is "alignflow" (torch's fused kernel takes gradients of the params'
        dtype only)."""
        if source is not None and self.step_kernel != "alignflow":
            raise ValueError(f"ClippedAdamW.set_gradient_source with step_kernel {self.step_kernel!r}: allowed "
                             "with step_kernel 'alignflow' only (torch's fused AdamW takes fp32 gradients of fp32 params)")
        self._gradient_source = source

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self._gradient_source is not None:
            self._gradient_source.clear_gradients()

    @torch.no_grad()
    def write_bf16_copies(self) -> None:
        """Set every bf16 copy to its param rounded to bf16 (step() does this itself)."""
        if self._bf16_copies:
            torch._foreach_copy_(list(self._bf16_copies.values()), list(self._bf16_copies))

    def _check_alignflow_groups(self) -> None:
        for i, group in enumerate(self.param_groups):
            for flag in ("amsgrad", "maximize", "capturable", "differentiable"):
                if group.get(flag):
                    raise ValueError(f"ClippedAdamW step_kernel 'alignflow' with {flag}=True (param group {i}): "
                                     "allowed only with step_kernel 'torch'")
            for j, p in enumerate(group["params"]):
                if p.dtype != torch.float32:
                    raise ValueError(f"ClippedAdamW step_kernel 'alignflow': param_groups[{i}]['params'][{j}] is "
                                     f"{p.dtype}; allowed: float32 params")

    def _grads_of(self) -> dict[torch.Tensor, torch.Tensor]:
        """{param: its gradient} in param-group order: `.grad`, else the gradient source's."""
        supplied = self._gradient_source.gradients() if self._gradient_source is not None else {}
        grads = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p in supplied:
                    raise ValueError(f"ClippedAdamW: a param of shape {tuple(p.shape)} has both a .grad and a gradient "
                                     "from its gradient source (its bf16 copy and the param itself were both used)")
                grad = p.grad if p.grad is not None else supplied.get(p)
                if grad is not None:
                    grads[p] = grad
        return grads

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise NotImplementedError("ClippedAdamW.step takes no closure")
        grads_of = self._grads_of()
        if not grads_of:
            return None
        grads = list(grads_of.values())
        if self.divisor_from_deepspeed:
            divisor, self._clip_divisor = self._clip_divisor, None
        else:
            norm = self.grad_norm_source() if self.grad_norm_source is not None else total_norm(grads)
            norm = torch.as_tensor(norm, dtype=torch.float32, device=grads[0].device)
            self.last_grad_norm = self._global_grad_norm = norm
            divisor = clip_divisor(norm, self.max_norm)
        if divisor is not None:
            divisor = torch.as_tensor(divisor, dtype=torch.float32, device=grads[0].device).reshape(1)
        if self.step_kernel == "alignflow":
            self._alignflow_step(divisor, grads_of)
            if self._gradient_source is not None:
                self._gradient_source.clear_gradients()
        else:
            self._torch_step(divisor)
        return None

    @staticmethod
    def _found_inf(divisor: torch.Tensor) -> torch.Tensor:
        """1.0 where the divisor is not finite (the step is skipped), else 0.0: GradScaler's found_inf.
        Two scalar launches: d * 0 is 0 for a finite divisor (>= 1) and NaN for inf or NaN."""
        return (divisor * 0.0).nan_to_num_(nan=1.0).reshape(())

    def _torch_step(self, divisor: torch.Tensor | None) -> None:
        if divisor is None:
            super().step()
        else:
            self.grad_scale, self.found_inf = divisor, self._found_inf(divisor)
            try:
                super().step()
            finally:
                del self.grad_scale, self.found_inf
        self.write_bf16_copies()

    def _state_of(self, p: torch.Tensor) -> dict:
        """p's AdamW state, created as torch's fused AdamW creates it."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self._host_steps[p] = (state["step"], 0)
        return state

    def _steps_taken(self, params: list[torch.Tensor]) -> list[int]:
        """Each param's step count as a host int; read from the device (one sync) only for a param
        whose state's step tensor is not the one last read (new, or replaced by load_state_dict)."""
        self._resolve_pending_finite()
        stale = [p for p in params if self._host_steps.get(p, (None,))[0] is not self.state[p]["step"]]
        if stale:
            values = torch.stack([self.state[p]["step"].float() for p in stale]).tolist()
            for p, value in zip(stale, values):
                self._host_steps[p] = (self.state[p]["step"], int(value))
        return [self._host_steps[p][1] for p in params]

    def _alignflow_step(self, divisor: torch.Tensor | None, grads_of: dict[torch.Tensor, torch.Tensor]) -> None:
        import kernels

        self._check_alignflow_groups()  # ZeRO 3 puts its flat partitions into the groups at each step
        calls: dict[tuple, list[torch.Tensor]] = {}  # (group, grad dtype, steps taken, has a copy): params
        for i, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p in grads_of]
            for p in params:
                self._state_of(p)
            for p, taken in zip(params, self._steps_taken(params)):
                calls.setdefault((i, grads_of[p].dtype, taken, p in self._bf16_copies), []).append(p)
        with kernels.use_backend("cuda"):
            for (i, _, taken, has_copy), params in calls.items():
                group, states = self.param_groups[i], [self.state[p] for p in params]
                kernels.adamw_step(params, [grads_of[p] for p in params], [s["exp_avg"] for s in states],
                                   [s["exp_avg_sq"] for s in states], taken + 1, lr=float(group["lr"]),
                                   betas=tuple(float(b) for b in group["betas"]), eps=group["eps"],
                                   weight_decay=group["weight_decay"], grad_scale=divisor,
                                   params_bf16=[self._bf16_copies[p] for p in params] if has_copy else None)
        params = [p for ps in calls.values() for p in ps]
        steps = [self.state[p]["step"] for p in params]
        if divisor is None:
            torch._foreach_add_(steps, 1)
            for p, step in zip(params, steps):
                self._host_steps[p] = (step, self._host_steps[p][1] + 1)
        else:  # the kernel skipped a step with a non-finite divisor: the counts advance by isfinite(divisor)
            finite = 1.0 - self._found_inf(divisor)
            torch._foreach_add_(steps, finite)
            self._pending_finite = (params, *self._to_host_later(finite))

    @staticmethod
    def _to_host_later(flag: torch.Tensor) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
        """(a host copy of `flag`, the event after which it holds it): no sync now."""
        if flag.device.type != "cuda":
            return flag.clone(), None
        host = torch.empty((), dtype=flag.dtype, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def _resolve_pending_finite(self) -> None:
        """Advance the host counters of the last step with a divisor by whether it was taken."""
        if self._pending_finite is None:
            return
        params, host, event = self._pending_finite
        self._pending_finite = None
        if event is not None:
            event.synchronize()
        taken = int(host.item())
        for p in params:
            step, value = self._host_steps[p]
            if step is self.state[p]["step"]:  # else replaced since (load_state_dict): read again anyway
                self._host_steps[p] = (step, value + taken)


def describe_step_kernel(step_kernel: str) -> str:
    """For the log: which kernel ClippedAdamW's step runs."""
    if step_kernel == "torch":
        return "torch's fused AdamW"
    from kernels import _cuda

    cpu = "the emulator" if _cuda.emulating() else "kernels.reference_adamw_step (ALIGNFLOW_CUEMU=1: the emulator)"
    return f"AlignFlow's CUDA C++ AdamW, csrc/adamw.cu (on CPU tensors {cpu}; kernels logs any fallback)"


# ----------------------------------------------------------------------------------------------
# DeepSpeed
# ----------------------------------------------------------------------------------------------

def hand_clipping_to(ds_optimizer, optimizer: ClippedAdamW) -> str:
    """Route DeepSpeed's clipping into `optimizer`'s step. Returns how (for the log):
      - ZeRO 1/2/3: the ZeRO optimizer keeps computing the global norm of its partitioned gradients
        (reduced over the data-parallel group; what `engine.get_global_grad_norm()` reports), and
        its `unscale_and_clip_grads`, which scaled the flat fp32 partition in place, now hands
        DeepSpeed's divisor to `optimizer` instead;
      - fp32 without ZeRO (the engine calls `optimizer` itself; DeepSpeed's `gradient_clipping` must
        be 0): `optimizer` takes the norm of the averaged full gradients.
    Raises TypeError for a DeepSpeed optimizer it does not know."""
    if ds_optimizer is optimizer:
        return "the optimizer's own norm of the full gradients (no ZeRO)"
    name = type(ds_optimizer).__name__
    if name in ("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3"):
        if not hasattr(ds_optimizer, "unscale_and_clip_grads") or getattr(ds_optimizer, "cpu_offload", False) \
                or getattr(ds_optimizer, "offload_optimizer", False):
            raise TypeError(f"{name} with optimizer offload (its step runs on the CPU)")

        def unscale_and_clip_grads(_grads_or_sub_group, total_norm):
            loss_scale = float(ds_optimizer.loss_scale)
            if ds_optimizer.clip_grad > 0.0:
                norm = total_norm if torch.is_tensor(total_norm) else torch.tensor(float(total_norm))
                # -1 is DeepSpeed's sentinel for an invalid norm (no host sync to test for it); an inf
                # or NaN divisor skips the step inside the optimizer
                norm = torch.where(norm < 0, torch.full_like(norm, float("inf")), norm)
                optimizer.set_clip_divisor(clip_divisor(norm, ds_optimizer.clip_grad, loss_scale))
            elif loss_scale != 1.0:
                optimizer.set_clip_divisor(torch.tensor(loss_scale))
            else:
                optimizer.set_clip_divisor(None)

        ds_optimizer.unscale_and_clip_grads = unscale_and_clip_grads
        optimizer.divisor_from_deepspeed = True
        return f"DeepSpeed {name}'s norm, its divisor applied inside the fused AdamW kernel"
    raise TypeError(f"DeepSpeed optimizer {name} (known: DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3, "
                    "or the client optimizer itself)")
