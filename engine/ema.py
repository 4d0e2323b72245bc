"""Exponential moving average of the fp32 master weights, kept where the master weights live.

Under DeepSpeed the fp32 master weights are partitioned: ZeRO-1/2 (and the bf16 optimizer) give each
rank a contiguous fragment of every parameter it owns, ZeRO-3 gives each rank an equal slice of every
parameter. The EMA keeps exactly the local part, so an update is one fused `lerp` with no
communication and no extra memory beyond one fp32 copy of the local shard. Gathering happens only when
the full EMA is needed (checkpoint, export, sample grids) and is collective: every rank must call
`full_state_dict`.

Parameters the optimizer does not own (frozen ones such as SiT's fixed `pos_embed`) and buffers are
taken once from the fp32 model before DeepSpeed converts it, and never change.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn


def _kind(param: nn.Parameter) -> str:
    if hasattr(param, "ds_id"):
        return "zero3"
    if hasattr(param, "_hp_mapping"):
        return "fragment"
    return "full"


class EMA:
    """fp32 EMA of the master weights of `module` (the DeepSpeed engine's module, or a plain module
    whose parameters are themselves the fp32 master weights).

    `initial_state`: the fp32 state_dict of the model before DeepSpeed wrapped it; the source of the
    frozen parameters and buffers.
    """

    def __init__(self, module: nn.Module, decay: float, initial_state: dict[str, torch.Tensor]):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = module
        self.names: list[str] = []          # trainable parameters, in module order
        self.params: list[nn.Parameter] = []
        self.kinds: list[str] = []
        self.shards: list[torch.Tensor | None] = []   # the local fp32 EMA (None: no local part)
        self.constants = {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
                          for k, v in initial_state.items()}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            self.names.append(name)
            self.params.append(param)
            self.kinds.append(_kind(param))
            self.constants.pop(name, None)
        self.refresh_sources()
        self.shards = [None if s is None else s.detach().clone() for s in self.sources]

    # -- the local fp32 master weights ----------------------------------------------------------

    def _source(self, param, kind):
        if kind == "zero3":
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(param).view(-1)
        if kind == "fragment":
            mapping = param._hp_mapping
            return None if mapping is None else mapping.get_hp_fragment().view(-1)
        if param.dtype != torch.float32:
            raise TypeError(f"parameter {self.names[len(self.sources)]} is {param.dtype} without fp32 master "
                            "weights; the EMA needs fp32 parameters or a DeepSpeed optimizer that keeps them")
        return param.detach().view(-1)

    def refresh_sources(self) -> None:
        """Re-point to the master weights (call after the optimizer state was replaced, e.g. a load)."""
        self.sources: list[torch.Tensor | None] = []
        for param, kind in zip(self.params, self.kinds):
            self.sources.append(self._source(param, kind))

    @torch.no_grad()
    def write_masters(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a complete fp32 state into the local fp32 master weights. DeepSpeed's bf16 mode builds
        its masters from the bf16 copy of the model; this restores the exact fp32 initial weights."""
        for i, name in enumerate(self.names):
            if self.kinds[i] != "full" and self.sources[i] is not None:
                self.sources[i].copy_(self._local_slice(i, state[name]))

    # -- update ---------------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        """ema = decay * ema + (1 - decay) * master, on the local shard."""
        decay = self.decay if decay is None else decay
        pairs = [(e, s) for e, s in zip(self.shards, self.sources) if e is not None and e.numel()]
        if pairs:
            ema, src = zip(*pairs)
            torch._foreach_lerp_(list(ema), list(src), 1.0 - decay)

    # -- gather / scatter ---------------------------------------------------------------------

    def _full(self, index: int) -> torch.Tensor:
        param, kind, shard = self.params[index], self.kinds[index], self.shards[index]
        if kind == "full":
            return shard.view_as(param).clone()
        if kind == "fragment":
            full = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
            if shard is not None:
                address = param._hp_mapping.lp_fragment_address
                full.narrow(0, address.start, address.numel).copy_(shard)
            dist.all_reduce(full, group=param._dp_group)
            return full.view(param.shape)
        # zero3: equal slices of the padded flat parameter, one per rank, in rank order
        group = param.ds_process_group
        world = dist.get_world_size(group=group)
        gathered = torch.empty(world * shard.numel(), dtype=torch.float32, device=shard.device)
        dist.all_gather_into_tensor(gathered, shard.contiguous(), group=group)
        return gathered.narrow(0, 0, param.ds_numel).view(param.ds_shape)

    def _local_slice(self, index: int, full: torch.Tensor) -> torch.Tensor | None:
        param, kind = self.params[index], self.kinds[index]
        flat = full.detach().float().reshape(-1).to(self.sources[index].device if self.sources[index] is not None
                                                     else full.device)
        if kind == "full":
            return flat.clone()
        if kind == "fragment":
            mapping = param._hp_mapping
            if mapping is None:
                return None
            address = mapping.lp_fragment_address
            return flat.narrow(0, address.start, address.numel).clone()
        size = self.sources[index].numel()
        rank = dist.get_rank(group=param.ds_process_group)
        out = torch.zeros(size, dtype=torch.float32, device=flat.device)
        start = rank * size
        count = max(0, min(size, flat.numel() - start))
        out[:count] = flat[start:start + count]
        return out

    def full_state_dict(self, to_cpu: bool = True) -> dict[str, torch.Tensor]:
        """The complete fp32 EMA state_dict in the model's own key order (collective on every rank)."""
        values = {name: self._full(i) for i, name in enumerate(self.names)}
        if to_cpu:
            values = {k: v.cpu() for k, v in values.items()}
        values.update({k: v.clone() for k, v in self.constants.items()})
        order = list(self.module.state_dict().keys())
        return {k: values[k] for k in order if k in values} | {k: v for k, v in values.items() if k not in order}

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take this rank's part of a complete EMA state_dict (as written by `full_state_dict`)."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state is missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
        self.refresh_sources()
        self.shards = [self._local_slice(i, state[name]) for i, name in enumerate(self.names)]
        for k in list(self.constants):
            if k in state:
                self.constants[k] = state[k].detach().float().clone() if state[k].is_floating_point() \
                    else state[k].detach().clone()


def reference_ema(ema: dict[str, torch.Tensor], params: Iterable[tuple[str, torch.Tensor]], decay: float):
    """The specification of one update on full fp32 tensors: ema <- decay * ema + (1 - decay) * param."""
    for name, value in params:
        ema[name] = decay * ema[name] + (1.0 - decay) * value.float()
    return ema
