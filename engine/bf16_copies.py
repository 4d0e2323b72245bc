"""Persistent bf16 copies of the fp32 Linear weights under bf16 autocast (`train.bf16_weight_copies`).

Under `train.precision: bf16-mixed` the weights are fp32 and torch.autocast casts each Linear's weight
and bias to bf16 at every forward (one read of 4 bytes and one write of 2 bytes per parameter, and a
launch per tensor), which the backward's matmuls then reuse. Here each Linear (and the patch
embedding's Conv2d) keeps a bf16 copy of its weight and bias as a non-persistent buffer (not in the
state_dict, so checkpoints and REPA's keys are unchanged) that is written once per optimizer step,
right after the fp32 master is updated: by the optimizer itself where it can (`set_bf16_copies`),
else by `WeightCopies.refresh`. The matmul then reads the copy in place of autocast's cast.

Numerics are autocast's exactly: `CopyIsCast` stands where autocast's cast stood (forward: the copy,
which equals the cast since both round the same fp32 weight to nearest; backward: the gradient cast
to the parameter's dtype, as the cast's backward does), and the matmul itself is the one autocast
runs (F.linear on bf16 operands; autocast still casts an fp32 input). The copies are used only
while autocast is on with their dtype; anywhere else the layer computes as before.

The model's adaLN modulation Linears (`SiT.modulation_layers`) get their copies as row blocks of one
concatenated buffer, so SiT's batched modulation matmul (`model.batched_modulation`) reads it as is,
with no copy into a concatenated buffer at every forward.

bf16 weight gradients (`grads=True`, train.bf16_weight_grads): the copies themselves are the autograd
leaves that the matmuls' weight and bias gradients land on, in bf16 as the matmuls produce them,
instead of being cast to fp32 into each parameter's `.grad` (autocast's cast backward: 2 bytes read
and 4 written per parameter, and later 2 bytes more read by the norm and the optimizer each). The
values are the same (bf16 to fp32 is exact); `gradients()` hands them to an optimizer that reads bf16
gradients (engine.optim.ClippedAdamW with step_kernel "alignflow"), `clear_gradients()` drops them.
With gradients, the modulation copies are one leaf, read by the batched matmul only: where the model
runs its modulation Linears one by one (`model.batched_modulation: false`) each gets a leaf of its own;
where the batched matmul does not run ('auto' off), those layers read their fp32 parameters as without
copies. Parameters a copy does not reach keep their fp32 `.grad`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHT_COPY, BIAS_COPY = "weight_bf16", "bias_bf16"        # buffer names on each layer
CONCAT_WEIGHT_COPY, CONCAT_BIAS_COPY = "modulation_weight_bf16", "modulation_bias_bf16"  # on the model


class CopyIsCast(torch.autograd.Function):
    """`copy` (the low-precision copy of `param`) standing in for autocast's cast of `param`. The
    backward gives `param` the gradient cast to its dtype, as the cast's backward (`_to_copy`) does."""

    @staticmethod
    def forward(ctx, param, copy):
        ctx.dtype = param.dtype
        return copy

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


def _copy_in_use(copy: torch.Tensor | None, param: torch.Tensor) -> bool:
    """Whether autocast would cast `param` to the dtype of `copy` here (so the copy can be that cast)."""
    if copy is None:
        return False
    device = copy.device.type
    return (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == copy.dtype
            and param.dtype == torch.float32)


def matmul_weights(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) for `layer`'s matmul: its bf16 copies where it has them and autocast would cast
    its parameters to bf16, else its parameters."""
    weight, bias = layer.weight, layer.bias
    copy = layer._buffers.get(WEIGHT_COPY)
    if not _copy_in_use(copy, weight):
        return weight, bias
    if copy.requires_grad:  # the copies are the gradients' leaves (grads=True)
        return copy, layer._buffers[BIAS_COPY] if bias is not None else None
    if bias is not None:
        bias = CopyIsCast.apply(bias, layer._buffers[BIAS_COPY])
    return CopyIsCast.apply(weight, copy), bias


def concatenated_copies(model: nn.Module, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (weight, bias) copies of the model's modulation layers as one concatenated buffer each,
    where it has them and autocast would cast `param` (one of those weights) to their dtype; else None."""
    weight = model._buffers.get(CONCAT_WEIGHT_COPY)
    if not _copy_in_use(weight, param):
        return None
    return weight, model._buffers[CONCAT_BIAS_COPY]


def _linear_forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, *matmul_weights(layer))


def _conv_forward(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return layer._conv_forward(x, *matmul_weights(layer))


def _uses_matmul_weights(layer: nn.Module) -> bool:
    """Layers whose own forward reads `matmul_weights` (sit.LinearGELU) rather than F.linear."""
    return getattr(type(layer), "reads_matmul_weights", False)


def _modulates_one_by_one(model: nn.Module) -> bool:
    """Whether the model's config turns its batched modulation matmul off (model.batched_modulation false)."""
    return getattr(getattr(model, "cfg", None), "batched_modulation", "auto") is False


class WeightCopies:
    """The bf16 copies of every nn.Linear (and zero-padded nn.Conv2d) of `model`, made now from its
    current weights. Attach after the model is on its device and in its final dtype (fp32), and after
    DeepSpeed has built its engine (ZeRO-1/2 re-point the parameters into flat buffers; the copies follow
    the parameter objects). ZeRO-3 partitions the parameters: not supported (the trainer refuses it).
    With `grads` the copies take the matmuls' gradients in bf16 (see the module docstring).

    The layers' classes are unchanged (DeepSpeed's autocast picks the gradient reduction dtype by
    module class): a plain nn.Linear / nn.Conv2d gets an instance `forward` reading its copies;
    a layer that reads them itself (`reads_matmul_weights`) keeps its own."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16, grads: bool = False):
        self.dtype, self.grads = dtype, grads
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear)
                       or (isinstance(m, nn.Conv2d) and m.padding_mode == "zeros")]
        if any(hasattr(p, "ds_id") for layer in self.layers for p in layer.parameters()):
            raise ValueError("bf16 weight copies of ZeRO-3-partitioned parameters: not supported")
        self._leaves: list[tuple[torch.Tensor, list[torch.Tensor], list[int] | None]] = []  # (leaf, params, rows)
        modulation = list(getattr(model, "modulation_layers", lambda: [])())
        grouped = self._concatenate(model, modulation) if modulation and not (
            grads and _modulates_one_by_one(model)) else {}
        self.params, self.copies = [], []
        for layer in self.layers:
            for name, copy_name in (("weight", WEIGHT_COPY), ("bias", BIAS_COPY)):
                param = getattr(layer, name)
                if param is None:
                    continue
                copy = grouped[id(layer)][name] if id(layer) in grouped else self._own_copy(layer, param, copy_name)
                self.params.append(param)
                self.copies.append(copy)
            if not _uses_matmul_weights(layer):
                forward = _linear_forward if isinstance(layer, nn.Linear) else _conv_forward
                layer.forward = functools.partial(forward, layer)
        self.refresh()

    def _empty(self, param: torch.Tensor) -> torch.Tensor:
        return torch.empty(param.shape, dtype=self.dtype, device=param.device)

    def _own_copy(self, layer: nn.Module, param: torch.Tensor, name: str) -> torch.Tensor:
        copy = self._empty(param)
        layer.register_buffer(name, copy, persistent=False)
        if self.grads:
            self._leaves.append((copy.requires_grad_(), [param], None))
        return copy

    def _concatenate(self, model: nn.Module, layers: list[nn.Linear]) -> dict[int, dict[str, torch.Tensor]]:
        """One (sum rows, in) weight buffer and one (sum rows,) bias buffer on `model`; returns {id(layer):
        {"weight": its rows, "bias": its rows}}. Without gradients each layer reads its rows where it runs
        alone; with them the buffers are the leaves and only the batched matmul reads them."""
        rows = [layer.weight.shape[0] for layer in layers]
        grouped = {id(layer): {} for layer in layers}
        for name, copy_name, concat_name in (("weight", WEIGHT_COPY, CONCAT_WEIGHT_COPY),
                                             ("bias", BIAS_COPY, CONCAT_BIAS_COPY)):
            params = [getattr(layer, name) for layer in layers]
            buffer = torch.empty((sum(rows), *params[0].shape[1:]), dtype=self.dtype, device=params[0].device)
            model.register_buffer(concat_name, buffer, persistent=False)
            if self.grads:
                self._leaves.append((buffer.requires_grad_(), params, rows))
            for layer, part in zip(layers, buffer.detach().split(rows)):
                grouped[id(layer)][name] = part
                if not self.grads:
                    layer.register_buffer(copy_name, part, persistent=False)
        return grouped

    def mapping(self) -> dict[torch.Tensor, torch.Tensor]:
        """{fp32 parameter: its bf16 copy}, for an optimizer that writes the copies in its step."""
        return dict(zip(self.params, self.copies))

    def gradients(self) -> dict[torch.Tensor, torch.Tensor]:
        """{fp32 parameter: the bf16 gradient its copy took in the backward} (grads=True; copies that took
        none are left out: their parameters have their own `.grad`)."""
        out = {}
        for leaf, params, rows in self._leaves:
            if leaf.grad is not None:
                out.update(zip(params, leaf.grad.split(rows) if rows else [leaf.grad]))
        return out

    def clear_gradients(self) -> None:
        """Drop the copies' gradients (after the optimizer step read them)."""
        for leaf, _, _ in self._leaves:
            leaf.grad = None

    @torch.no_grad()
    def refresh(self) -> None:
        """Copies = parameters rounded to bf16 (after an optimizer step, a checkpoint load, an init)."""
        torch._foreach_copy_(self.copies, [p.detach() for p in self.params])

    def numel(self) -> int:
        return sum(c.numel() for c in self.copies)
