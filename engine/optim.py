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

Numerics: the clip is applied as g / d instead of g * (1 / d) (DeepSpeed) or g * (c / (norm + 1e-6))
(torch), so a clipped step differs from the reference by float rounding of the gradient (one ulp);
an unclipped step (d = 1) is the same.

bf16 weight copies (`set_bf16_copies`): a bf16 forward that reads a bf16 copy of each fp32 parameter
hands the optimizer {fp32 param: bf16 tensor}; after every step() each copy holds its parameter
rounded to bf16 (round to nearest even, as `param.to(torch.bfloat16)`), so the model casts nothing per
step. torch's kernel path writes them in one `torch._foreach_copy_` after its step.
"""
from __future__ import annotations

from typing import Callable

import torch

CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_ and DeepSpeed: the norm plus this, over max_norm


def clip_divisor(total_norm: torch.Tensor, max_norm: float, loss_scale: float = 1.0) -> torch.Tensor:
    """What the gradients are divided by: loss_scale x max(1, (norm / loss_scale + 1e-6) / max_norm),
    DeepSpeed's `combined_scale` (the norm is of the loss-scaled gradients); a non-finite norm gives a
    non-finite divisor, as the reference's coefficient is then non-finite too."""
    clip = ((total_norm.float() / loss_scale) + CLIP_EPS) / max_norm
    return torch.clamp(clip, min=1.0) * loss_scale


class ClippedAdamW(torch.optim.AdamW):
    """torch's fused AdamW that clips the global gradient norm to `max_norm` inside its kernel.

    `step()` takes the divisor DeepSpeed handed over (`set_clip_divisor`, once per step), else the
    global norm of its own gradients (`grad_norm_source`, where given, supplies an already computed
    norm instead). The norm it used is `last_grad_norm` (a device tensor; None when DeepSpeed
    supplied the divisor: DeepSpeed keeps the norm) and, for DeepSpeed's stage-0 engine, which reads
    it from its optimizer, `_global_grad_norm`.

    `set_bf16_copies({param: bf16 tensor})` (None: none) makes every step() also leave each copy equal
    to its parameter rounded to bf16; `writes_bf16_copies` says whether it does."""

    def __init__(self, params, max_norm: float, grad_norm_source: Callable[[], torch.Tensor] | None = None,
                 **adamw_kwargs):
        if adamw_kwargs.pop("fused", True) is False:
            raise ValueError("ClippedAdamW runs torch's fused AdamW kernel only (fused=False asked for)")
        if adamw_kwargs.get("foreach"):
            raise ValueError("ClippedAdamW runs torch's fused AdamW kernel, not the foreach one")
        super().__init__(params, fused=True, **adamw_kwargs)
        if not max_norm > 0:
            raise ValueError(f"ClippedAdamW max_norm {max_norm!r}: allowed a number > 0")
        self.max_norm = float(max_norm)
        self.grad_norm_source = grad_norm_source
        self.last_grad_norm: torch.Tensor | None = None
        self._clip_divisor: torch.Tensor | None = None
        self.divisor_from_deepspeed = False  # set by hand_clipping_to for a ZeRO optimizer
        self._bf16_copies: dict[torch.Tensor, torch.Tensor] = {}

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
        self._write_bf16_copies()

    @torch.no_grad()
    def _write_bf16_copies(self) -> None:
        if self._bf16_copies:
            torch._foreach_copy_(list(self._bf16_copies.values()), list(self._bf16_copies))

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise NotImplementedError("ClippedAdamW.step takes no closure")
        grads = self._grads()
        if not grads:
            return None
        if self.divisor_from_deepspeed:
            divisor, self._clip_divisor = self._clip_divisor, None
        else:
            norm = self.grad_norm_source() if self.grad_norm_source is not None else \
                torch.nn.utils.get_total_norm(grads, 2.0)
            norm = torch.as_tensor(norm, dtype=torch.float32, device=grads[0].device)
            self.last_grad_norm = self._global_grad_norm = norm
            divisor = clip_divisor(norm, self.max_norm)
        if divisor is None:
            super().step()
        else:
            self.grad_scale = torch.as_tensor(divisor, dtype=torch.float32, device=grads[0].device).reshape(1)
            try:
                super().step()
            finally:
                del self.grad_scale
        self._write_bf16_copies()
        return None


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
                # -1 is DeepSpeed's sentinel for an invalid norm (no host sync to test for it)
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
