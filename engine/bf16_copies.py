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


class WeightCopies:
    """The bf16 copies of every nn.Linear (and zero-padded nn.Conv2d) of `model`, made now from its
    current weights. Attach after the model is on its device and in its final dtype (fp32), and after
    DeepSpeed has built its engine (ZeRO-1/2 re-point the parameters into flat buffers; the copies follow
    the parameter objects). ZeRO-3 partitions the parameters: not supported (the trainer refuses it).

    The layers' classes are unchanged (DeepSpeed's autocast picks the gradient reduction dtype by
    module class): a plain nn.Linear / nn.Conv2d gets an instance `forward` reading its copies;
    a layer that reads them itself (`reads_matmul_weights`) keeps its own."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear)
                       or (isinstance(m, nn.Conv2d) and m.padding_mode == "zeros")]
        if any(hasattr(p, "ds_id") for layer in self.layers for p in layer.parameters()):
            raise ValueError("bf16 weight copies of ZeRO-3-partitioned parameters: not supported")
        concatenated = list(getattr(model, "modulation_layers", lambda: [])())
        if concatenated:
            self._concatenate(model, concatenated)
        grouped = {id(layer) for layer in concatenated}
        for layer in self.layers:
            if id(layer) not in grouped:
                layer.register_buffer(WEIGHT_COPY, self._empty(layer.weight), persistent=False)
                if layer.bias is not None:
                    layer.register_buffer(BIAS_COPY, self._empty(layer.bias), persistent=False)
            if not _uses_matmul_weights(layer):
                forward = _linear_forward if isinstance(layer, nn.Linear) else _conv_forward
                layer.forward = functools.partial(forward, layer)
        self.params, self.copies = [], []
        for layer in self.layers:
            for name, copy_name in ((("weight", WEIGHT_COPY), ("bias", BIAS_COPY))):
                if getattr(layer, name) is not None:
                    self.params.append(getattr(layer, name))
                    self.copies.append(layer._buffers[copy_name])
        self.refresh()

    def _empty(self, param: torch.Tensor) -> torch.Tensor:
        return torch.empty(param.shape, dtype=self.dtype, device=param.device)

    def _concatenate(self, model: nn.Module, layers: list[nn.Linear]) -> None:
        """One (sum rows, in) weight buffer and one (sum rows,) bias buffer on `model`, each layer's
        copies its rows of them."""
        for name, copy_name, concat_name in (("weight", WEIGHT_COPY, CONCAT_WEIGHT_COPY),
                                             ("bias", BIAS_COPY, CONCAT_BIAS_COPY)):
            params = [getattr(layer, name) for layer in layers]
            buffer = torch.empty((sum(p.shape[0] for p in params), *params[0].shape[1:]), dtype=self.dtype,
                                 device=params[0].device)
            model.register_buffer(concat_name, buffer, persistent=False)
            for layer, rows in zip(layers, buffer.split([p.shape[0] for p in params])):
                layer.register_buffer(copy_name, rows, persistent=False)

    def mapping(self) -> dict[torch.Tensor, torch.Tensor]:
        """{fp32 parameter: its bf16 copy}, for an optimizer that writes the copies in its step."""
        return dict(zip(self.params, self.copies))

    @torch.no_grad()
    def refresh(self) -> None:
        """Copies = parameters rounded to bf16 (after an optimizer step, a checkpoint load, an init)."""
        torch._foreach_copy_(self.copies, [p.detach() for p in self.params])

    def numel(self) -> int:
        return sum(c.numel() for c in self.copies)
