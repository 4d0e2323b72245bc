"""One autograd registration per fused op, for eager and `torch.compile` alike.

A fused op is written once, as a forward and a backward that launch its kernels:

    forward(*inputs) -> tuple[Tensor, ...]
        the op's outputs, then any tensors only the backward reads (LayerNorm statistics, the
        attention log-sum-exp, ...); typed, as torch.library reads the schema from the annotations
    save(inputs, results) -> tuple[Tensor | None, ...]
        the tensors the backward reads
    backward(saved, grads, needs, *constants) -> list[Tensor | None]
        one gradient per tensor input, in order (None where `needs` says it is not needed); `grads`
        are the gradients of the op's outputs, `constants` its non-tensor inputs. A gradient may
        come in any shape with the input's number of elements and in any dtype: it is viewed and
        cast to its input's
    fake_forward, fake_backward: the same signatures, returning empty tensors of the right shapes

`fused_op` builds from these
  - an autograd.Function for eager calls: the cheapest host path (a torch.library custom op costs
    about 90 us more per eager call on the CPU), and
  - a torch.library custom op with `register_fake` and `register_autograd`, whose backward is a
    second custom op, for torch.compile: both are opaque to the compiler, so graphs neither break
    nor fall back,
and both run the same forward and backward.
"""
from __future__ import annotations

import inspect
import typing
from typing import Callable, Optional

import torch
from torch import Tensor

_TENSOR_TYPES = (Tensor, Optional[Tensor])


def _empty(like: list) -> Tensor:
    ref = next((t for t in like if t is not None), None)
    return torch.empty(0) if ref is None else ref.new_empty(0)


class FusedOp:
    """`op(*inputs)` runs the eager autograd.Function, or the custom op under torch.compile."""

    def __init__(self, name: str, forward: Callable, backward: Callable, save: Callable,
                 fake_forward: Callable, fake_backward: Callable, num_outputs: int = 1):
        hints = typing.get_type_hints(forward)
        params = list(inspect.signature(forward).parameters)
        tensor_pos = tuple(i for i, p in enumerate(params) if hints[p] in _TENSOR_TYPES)
        constant_pos = tuple(i for i in range(len(params)) if i not in tensor_pos)
        self.name, self.num_outputs = name, num_outputs
        single = num_outputs == 1
        if hints["return"] is Tensor:  # a forward that returns one tensor
            one, forward = forward, lambda *inputs: (one(*inputs),)
            fake_one, fake_forward = fake_forward, lambda *inputs: (fake_one(*inputs),)
            op_forward, op_fake = one, fake_one
        else:
            op_forward, op_fake = forward, fake_forward
        self.single_tensor_op = hints["return"] is Tensor

        def saved_meta(inputs):
            return [None if inputs[i] is None else (inputs[i].shape, inputs[i].dtype) for i in tensor_pos]

        def input_grads(tensor_grads, meta):
            out = [None] * len(params)
            for i, g, m in zip(tensor_pos, tensor_grads, meta):
                if g is not None:
                    if g.shape != m[0]:
                        g = g.reshape(m[0])
                    out[i] = g if g.dtype == m[1] else g.to(m[1])
            return tuple(out)

        def eager_forward(ctx, *inputs):
            results = forward(*inputs)
            ctx.save_for_backward(*save(inputs, results))
            ctx.constants = [inputs[i] for i in constant_pos]
            ctx.meta = saved_meta(inputs)
            return results[0] if single else results[:num_outputs]

        def eager_backward(ctx, *grads):
            needs = [ctx.needs_input_grad[i] for i in tensor_pos]
            return input_grads(backward(ctx.saved_tensors, grads, needs, *ctx.constants), ctx.meta)

        # named after the op ("alignflow::adaln_modulate" -> AdalnModulate, grad_fn AdalnModulateBackward)
        self.eager = type("".join(w.title() for w in name.split("::")[-1].split("_")), (torch.autograd.Function,),
                          {"forward": staticmethod(eager_forward), "backward": staticmethod(eager_backward)})

        # torch.compile: the forward as a custom op (schema from its annotations) and the backward as a
        # second one, whose schema is (saved, grads, needs, *the forward's constants) -> Tensor[].
        self.op = torch.library.custom_op(name, op_forward, mutates_args=())
        self.op.register_fake(op_fake)

        def materialized(fn):
            # a custom op returns tensors only, none aliasing another: None becomes an empty tensor,
            # a view its own copy
            def run(saved, grads, needs, *constants):
                like = [*saved, *grads]
                return [_empty(like) if g is None else (g.clone() if g._is_view() else g)
                        for g in fn(saved, grads, needs, *constants)]
            return run

        signature = inspect.Signature(
            [inspect.Parameter("saved", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=list[Optional[Tensor]]),
             inspect.Parameter("grads", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=list[Optional[Tensor]]),
             inspect.Parameter("needs", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=list[bool])]
            + [inspect.Parameter(params[i], inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hints[params[i]])
               for i in constant_pos],
            return_annotation=list[Tensor])
        prototype = materialized(backward)
        prototype.__signature__ = signature
        schema = torch.library.infer_schema(prototype, mutates_args=())
        self.backward_op = torch.library.custom_op(name + "_backward", prototype, mutates_args=(), schema=schema)
        self.backward_op.register_fake(materialized(fake_backward))

        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*save(inputs, (output,) if self.single_tensor_op else output))
            ctx.constants = [inputs[i] for i in constant_pos]
            ctx.meta = saved_meta(inputs)

        def compiled_backward(ctx, *grads):
            needs = [ctx.needs_input_grad[i] for i in tensor_pos]
            raw = self.backward_op(list(ctx.saved_tensors), list(grads[:num_outputs]), needs, *ctx.constants)
            return input_grads([g if need else None for g, need in zip(raw, needs)], ctx.meta)

        self.op.register_autograd(compiled_backward, setup_context=setup_context)

    def __call__(self, *inputs):
        if torch.compiler.is_compiling():
            results = self.op(*inputs)
            if self.single_tensor_op:
                return results
            return results[0] if self.num_outputs == 1 else results[:self.num_outputs]
        return self.eager.apply(*inputs)


def fused_op(name: str, *, forward, backward, save, fake_forward, fake_backward, num_outputs: int = 1) -> FusedOp:
    """Register one fused op for eager and compiled use (see the module docstring)."""
    return FusedOp(name, forward, backward, save, fake_forward, fake_backward, num_outputs)
