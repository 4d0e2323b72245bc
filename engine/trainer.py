"""The DeepSpeed trainer: distributed setup, the training step, EMA, checkpoints and monitoring.

Precision and distribution live here, not in the model: DeepSpeed converts the fp32 SiT to bf16 (with
fp32 master weights in the ZeRO optimizer) or keeps it fp32, shards optimizer state / gradients /
parameters for ZeRO 1/2/3, accumulates gradients and clips the global norm. One optimizer step:

    for each micro-batch: encoders(image) -> z targets (+ REG class token); latents ~ posterior;
        transport.training_losses(engine, ...) -> loss; all ranks agree it is finite; backward
    engine.step() (clip, AdamW, lr schedule) -> EMA update -> log -> checkpoint / sample grid

Without a GPU, DeepSpeed's CPU accelerator and gloo are selected before deepspeed is imported.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist

from engine import checkpoint as ckpt
from engine.distributed import (PeerLostError, init_distributed, is_collective_failure, release_shm_buffer,
                                set_collective_timeout, world_size_from_env)
from engine.config import (ConfigError, ExperimentConfig, check_latent_grid, deepspeed_config, resolve_device,
                           resolve_precision, validate)

log = logging.getLogger("engine.trainer")


class NonFiniteLossError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# Distributed setup
# ----------------------------------------------------------------------------------------------

def nonfinite_inputs(batch: dict, inputs: dict[str, torch.Tensor]) -> str | None:
    """The first of `inputs` (described by name -> (B, ...) tensor, in the order they were made) that
    holds NaN/inf, with the keys of the samples concerned. The images are uint8 and always finite, so a
    bad input comes from the latent space's encoder or an alignment encoder (the loader drops samples
    whose latent-shard rows are not finite, engine.data.loader.Loader)."""
    for name, tensor in inputs.items():
        bad = (~torch.isfinite(tensor)).flatten(1).any(1).nonzero().flatten().tolist()
        if bad:
            keys = [batch["keys"][i] for i in bad] if "keys" in batch else bad
            return f"non-finite {name} for samples {keys[:5]}"
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rank_seed(seed: int, rank: int) -> int:
    """Distinct, reproducible per-rank seeds (noise, time and label dropout differ across ranks)."""
    return (seed * 1_000_003 + 7919 * (rank + 1)) % 2 ** 63


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule
# ----------------------------------------------------------------------------------------------

def warmup_lambda(warmup_steps: int):
    def factor(step: int) -> float:
        return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
    return factor


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg: ExperimentConfig):
        world = world_size_from_env()
        validate(cfg, world_size=world)
        self.cfg = cfg
        device_type = resolve_device(cfg)
        self.precision = resolve_precision(cfg, device_type)
        if self.precision == "bf16-mixed" and importlib.util.find_spec("deepspeed.runtime.torch_autocast") is None:
            import deepspeed
            raise RuntimeError(f"train.precision='bf16-mixed' needs DeepSpeed's torch_autocast config, which "
                               f"DeepSpeed {deepspeed.__version__} lacks: upgrade DeepSpeed or use 'bf16'")
        self.dist = init_distributed(device_type, require_group=True, timeout_s=cfg.train.collective_timeout_s)
        self.rank, self.world_size, self.device = self.dist.rank, self.dist.world_size, self.dist.device
        self.is_main = self.rank == 0
        self.output_dir = cfg.train.output_dir
        self.checkpoint_dir = os.path.join(self.output_dir, "checkpoints")
        if self.is_main:
            os.makedirs(self.output_dir, exist_ok=True)

        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
            torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32

        import kernels
        backend = cfg.train.kernels_backend
        kernels.set_backend(("triton" if device_type == "cuda" else "torch") if backend == "auto" else backend)

        from engine import monitor
        self.monitor = monitor.Monitor(cfg, self.is_main, self.output_dir)
        self.monitor.info(f"rank {self.rank}/{self.world_size} on {self.device}, precision {self.precision}, "
                          f"kernels backend {kernels.get_backend()}")
        self._build()

    # -- construction -------------------------------------------------------------------------

    def _build(self) -> None:
        import deepspeed

        from engine.data import build_loader
        from engine.models import build_model
        from engine.models.latents import build_latent_space
        from engine.transport import Transport

        cfg = self.cfg
        # The model is initialised identically on every rank (ZeRO-3 partitions each rank's own copy).
        seed_everything(cfg.train.seed)
        model = build_model(cfg.model)
        if cfg.checkpoint.init_weights:
            self._init_weights(model)
        self.initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.flops_per_sample = model.flops_per_sample() if hasattr(model, "flops_per_sample") else 0.0

        self.loader = build_loader(cfg.data, self.rank, self.world_size, self.device)
        if self.loader.num_classes > cfg.model.num_classes:
            raise ConfigError("model.num_classes", cfg.model.num_classes,
                              f"at least {self.loader.num_classes}, the number of classes in the data")
        self.encoders = self._build_encoders()
        self.latent_space = build_latent_space(cfg.latent, device=self.device)
        self._check_latent_grid()
        self.transport = Transport(cfg.transport)

        fused = cfg.optim.fused == "true" or (cfg.optim.fused == "auto" and self.device.type == "cuda")
        params = [p for p in model.parameters() if p.requires_grad]
        if self.device.type == "cuda":
            model = model.to(self.device)
            params = [p for p in model.parameters() if p.requires_grad]
        self.ds_config = deepspeed_config(cfg, self.world_size, self.precision, self.device.type)
        self.fused_clip = self._fused_clip()
        adamw = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                     weight_decay=cfg.optim.weight_decay)
        if self.fused_clip:
            from engine.optim import ClippedAdamW

            optimizer = ClippedAdamW(params, max_norm=cfg.optim.grad_clip, step_kernel=cfg.optim.step_kernel, **adamw)
        else:
            optimizer = torch.optim.AdamW(params, fused=fused or None, **adamw)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(cfg.optim.warmup_steps))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False)
        release_shm_buffer(self.dist)  # DeepSpeed leaves its CPU all-reduce buffer in /dev/shm otherwise
        self.clip_optimizer = optimizer if self.fused_clip else None
        self._skip_identity_allreduce()
        if self.fused_clip:
            from engine.optim import describe_step_kernel, hand_clipping_to

            how = hand_clipping_to(self.engine.optimizer, optimizer)
            self.monitor.info(f"gradient clipping inside the fused AdamW step (optim.fused_clip): {how}; "
                              f"step kernel (optim.step_kernel): {describe_step_kernel(cfg.optim.step_kernel)}")
        self.accum = self.engine.gradient_accumulation_steps()
        self.copies_written_by_optimizer = False
        self.weight_copies = self._weight_copies(optimizer)
        set_collective_timeout(cfg.train.collective_timeout_s)  # DeepSpeed's own groups too
        self.model_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        if cfg.train.compile:
            # DeepSpeed compiles the module it wraps: the state_dict keys, checkpoints, the EMA and the
            # samplers (which use self.engine.module) are unchanged.
            # train.cuda_graphs: Inductor's CUDA graph trees over the compiled forward and backward graphs;
            # DeepSpeed's gradient hooks, reductions and step stay outside them (see README, "Launch overhead")
            mode = {"mode": "reduce-overhead"} if cfg.train.cuda_graphs else {}
            self.engine.compile(backend="inductor", compile_kwargs=mode)
            self.monitor.info("model compiled with torch.compile (inductor" + (", CUDA graphs" if mode else "")
                              + "); the first steps include compile time")
            if self.device.type == "cuda":  # the fused encoders' bf16 path (on the CPU they run timm's fp32 code)
                for encoder in self.encoders:
                    if encoder.cfg.fused:
                        encoder.compile_features(dynamic=False, **mode)
            if self.engine.zero_optimization_stage() == 3:
                # Seen with DeepSpeed 0.19.8 / torch 2.14: 29 graphs for a 2-block SiT, recompiles at the limit.
                self.monitor.warn("train.compile with ZeRO-3: DeepSpeed's parameter-gather hooks break the graph at "
                                  "every module, so compile runs many small graphs; ZeRO-1/2 compile whole graphs")

        from engine.ema import EMA
        # With ema.enabled false the tracker follows the weights (decay 0), so exports and samples
        # still work and hold the raw fp32 weights.
        self.ema = EMA(self.engine.module, cfg.ema.decay if cfg.ema.enabled else 0.0, self.initial_state)
        if self.model_dtype != torch.float32:  # the fp32 masters live in the optimizer
            self.ema.write_masters(self.initial_state)
            self.ema = EMA(self.engine.module, self.ema.decay, self.initial_state)

        self.step = 0
        self.micro_attempts = 0         # micro-batches drawn, including skipped ones
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self.fixed_batch = None
        self.wandb_run_id = None        # set by a resume: the wandb run to continue
        self.latent_generator = torch.Generator(device=self.device)
        seed_everything(rank_seed(cfg.train.seed, self.rank))
        self.latent_generator.manual_seed(rank_seed(cfg.train.seed + 1, self.rank))
        self._resume()
        if self.weight_copies is not None:  # the resumed weights (the initial ones were copied when made)
            self.weight_copies.refresh()
        self._data_iter = None
        self.evaluator = None
        if cfg.eval.every:
            from engine.evaluate import OnlineEvaluator
            with self.training_rng_untouched():
                self.evaluator = OnlineEvaluator(self)

    def _skip_identity_allreduce(self) -> None:
        """One rank without ZeRO, the optimizer torch's own (not DeepSpeed's stage-0 bf16/fp16 wrappers):
        DeepSpeed's gradient all-reduce after the backward is then the identity, but it still flattens the
        gradients into buckets, scales them by 1 / world size, all-reduces and copies them back, two
        passes over every gradient in each direction. Skipped (engine.enable_backward_allreduce), the
        gradients are bitwise what they were (tests/engine/test_train.py)."""
        engine = self.engine
        if (self.world_size == 1 and engine.zero_optimization_stage() == 0 and engine.enable_backward_allreduce
                and isinstance(engine.optimizer, torch.optim.Optimizer)  # DeepSpeed's wrappers are not
                and engine.communication_data_type == torch.float32):
            engine.enable_backward_allreduce = False
            self.monitor.info("one rank without ZeRO: DeepSpeed's gradient all-reduce (the identity here: flatten, "
                              "scale by 1, all-reduce, copy back) is skipped")

    def _weight_copies(self, optimizer):
        """train.bf16_weight_copies: bf16 copies of the model's Linear weights that its matmuls read in place
        of autocast's casts (engine/bf16_copies.py), or None. Without ZeRO the optimizer updates the model's
        own fp32 parameters and, where it can (`set_bf16_copies`), writes the copies in the same pass; under
        ZeRO-1/2 it updates a flat fp32 partition that DeepSpeed copies back into the parameters and
        all-gathers inside engine.step(), so train_step refreshes the copies after that."""
        from engine.config import resolve_bf16_weight_copies, resolve_bf16_weight_grads

        stage = self.engine.zero_optimization_stage()
        if not resolve_bf16_weight_copies(self.cfg, self.device.type, self.precision, stage):
            return None
        from engine.bf16_copies import WeightCopies

        # train.bf16_weight_grads: ZeRO-0 on one rank with optim.step_kernel alignflow, so the engine steps
        # this very optimizer (ClippedAdamW)
        grads = resolve_bf16_weight_grads(self.cfg, self.device.type, self.precision, stage, self.world_size,
                                          self.accum)
        copies = WeightCopies(self.engine.module, grads=grads)
        writer = "train_step after each optimizer step"
        if self.engine.optimizer is optimizer and hasattr(optimizer, "set_bf16_copies"):
            optimizer.set_bf16_copies(copies.mapping())
            self.copies_written_by_optimizer = True
            writer = "the optimizer's step"
        if grads:
            optimizer.set_gradient_source(copies)
        self.monitor.info(f"bf16 weight copies (train.bf16_weight_copies): {copies.numel() / 1e6:.1f}M weights, "
                          f"written by {writer}; their matmuls' gradients (train.bf16_weight_grads) "
                          + ("stay bf16 on the copies, read by the optimizer" if grads else "cast to fp32 into .grad"))
        return copies

    def _fused_clip(self) -> bool:
        """optim.fused_clip resolved (engine/optim.py), after the checks that need the DeepSpeed JSON."""
        from engine.config import resolve_fused_clip

        cfg = self.cfg
        on = resolve_fused_clip(cfg, self.device.type, self.precision)
        offload = (self.ds_config["zero_optimization"].get("offload_optimizer") or {}).get("device", "none")
        if on and offload not in (None, "none"):
            if cfg.optim.fused_clip == "true":
                raise ConfigError("optim.fused_clip", cfg.optim.fused_clip,
                                  f"'auto' or 'false' with optimizer offload ({offload}) in {cfg.train.deepspeed_config}")
            on = False
        if cfg.optim.step_kernel == "alignflow" and not on:
            why = f"optimizer offload ({offload}) turns it off" if offload not in (None, "none") else "it is off"
            raise ConfigError("optim.step_kernel", cfg.optim.step_kernel,
                              f"'torch' unless optim.fused_clip is on ({why}: the kernel runs ClippedAdamW's step)")
        return on

    def _init_weights(self, model) -> None:
        """Load checkpoint.init_weights strict into `model` (on every rank), after checking that the
        config's model is the one the checkpoint holds (naming the first key that differs)."""
        from engine.models.pretrained import check_model_matches, load_pretrained

        _, state, fixed, source = load_pretrained(self.cfg.checkpoint.init_weights, self.cfg.to_dict())
        check_model_matches(fixed, self.cfg.model, f"checkpoint.init_weights ({source})")
        model.load_state_dict(state, strict=True)
        self.monitor.info(f"initialised the model and its EMA from {source}")

    def _check_latent_grid(self) -> None:
        """The model's input grid against the built latent space (and its shards), and the shards'
        normalisation against latent.scale / latent.shift."""
        cfg, space = self.cfg, self.latent_space
        check_latent_grid(cfg, space.channels, space.downsample)
        if cfg.data.latents_root is not None:
            from engine.data.latent_shards import holds_raw_moments, read_meta

            meta = read_meta(cfg.data.latents_root)
            channels = meta["shape"][0]
            if holds_raw_moments(meta, cfg.data.latents_root):  # latent.scale / shift applied on read: any go
                self.monitor.info(f"latent shards at {cfg.data.latents_root} hold raw posterior moments; "
                                  f"latent.scale={cfg.latent.scale!r} and latent.shift={cfg.latent.shift!r} "
                                  "applied on read")
            else:  # pre-scaled shards: the latent space holds its own as per-channel buffers
                for key in ("scale", "shift"):
                    if f"latent_{key}" not in meta:
                        continue
                    made = torch.as_tensor(meta[f"latent_{key}"], dtype=torch.float32).expand(channels)
                    if not torch.allclose(made, getattr(space, key).flatten().cpu(), rtol=1e-6, atol=0):
                        raise ConfigError(f"latent.{key}", getattr(cfg.latent, key),
                                          f"{meta[f'latent_{key}']!r}, the normalisation baked into the pre-scaled "
                                          f"latent shards at data.latents_root={cfg.data.latents_root!r} (or rewrite "
                                          "them with engine.preprocess: its shards hold raw moments and take any "
                                          "latent.scale / latent.shift)")
        if cfg.data.source == "repa":
            channels, side = self.loader.latents.shape[:2]
            if space.channels != channels or side * space.downsample != cfg.data.resolution:
                raise ConfigError("latent.kind", cfg.latent.kind,
                                  f"the VAE that encoded the vae-sd/ latents of data.root={cfg.data.root!r} "
                                  f"({channels} x {side} x {side} for {cfg.data.resolution} px images; this one "
                                  f"gives {space.channels} channels at {space.downsample}x downsampling)")

    def _build_encoders(self):
        from engine.models.encoders import build_encoder

        encoders = []
        for i, enc_cfg in enumerate(self.cfg.encoders):
            if self.cfg.train.bootstrap_encoder:
                from engine.bootstrap_encoder import ensure_encoder_weights

                enc_cfg = ensure_encoder_weights(self.cfg, i, self.rank, self.device, self.loader, self.monitor)
                self.cfg.encoders[i] = enc_cfg
            encoder = build_encoder(enc_cfg, device=self.device).eval()
            if encoder.embed_dim != self.cfg.model.z_dims[i]:
                raise ConfigError(f"model.z_dims[{i}]", self.cfg.model.z_dims[i],
                                  f"{encoder.embed_dim}, the embed_dim of encoders[{i}] ({enc_cfg.name})")
            tokens = (self.cfg.model.input_size // self.cfg.model.patch_size) ** 2
            if encoder.num_patches != tokens:
                raise ConfigError(f"encoders[{i}].image_size", enc_cfg.image_size,
                                  f"a size at which {enc_cfg.name} gives the model's {tokens} patch tokens (it gives "
                                  f"{encoder.num_patches} at {enc_cfg.input_size} px)")
            where = enc_cfg.weights_path or ("local hub cache" if enc_cfg.pretrained else "random weights")
            self.monitor.info(f"aligning projector {i} to encoder {enc_cfg.name} ({where})")
            encoders.append(encoder)
        return encoders

    # -- resume -------------------------------------------------------------------------------

    def _resume(self) -> None:
        candidates, warnings = ckpt.resume_candidates(self.cfg.checkpoint.resume, self.checkpoint_dir)
        for warning in warnings:
            self.monitor.warn(warning)
        if not candidates:
            return
        problems = []
        for directory, tag in candidates:  # the newest readable one; every rank takes the same
            problem = ckpt.agree(ckpt.check_readable(os.path.join(directory, tag)))
            if problem is None:
                break
            problems.append(problem)
            if len(candidates) > 1:
                self.monitor.warn(f"checkpoint {os.path.join(directory, tag)} cannot be resumed: {problem}; trying the "
                                  "next older complete checkpoint")
        else:
            raise ckpt.CorruptCheckpointError(f"no readable checkpoint to resume from (checkpoint.resume="
                                              f"{self.cfg.checkpoint.resume!r}): " + "; ".join(problems))
        if problems:
            self.monitor.warn(f"resuming from the older checkpoint {os.path.join(directory, tag)}: the steps after it "
                              "are trained again")
        fresh = self._optimizer_settings()  # what this config builds, before the checkpoint's are loaded
        changes = []
        step, rank_state, ema_state = ckpt.load_checkpoint(
            self.engine, directory, tag, self.precision,
            before_load=lambda state, tag_dir: changes.extend(self._check_resume(state, tag_dir)))
        self.step = step
        if any(key.startswith("optim.") for key, *_ in changes):
            self._apply_optimizer_settings(fresh)
        for key, old, new, rule in changes:
            what = "moved" if rule == "path" else f"applied from step {step}"
            self.monitor.info(f"resume: {key} {old!r} -> {new!r} ({what})")
        self.loader.load_state_dict(rank_state["data"])
        ckpt.set_rng_state(rank_state["rng"])
        self.latent_generator.set_state(rank_state["latent_generator"])
        self.micro_attempts = rank_state["micro_attempts"]
        self.nonfinite_total = rank_state["nonfinite_total"]
        self.nonfinite_in_row = rank_state["nonfinite_in_row"]
        self.wandb_run_id = rank_state.get("wandb_run_id")
        if ema_state is None:
            raise FileNotFoundError(f"{directory}/{tag} has no {ckpt.EMA_FILE}")
        self.ema.load_full_state_dict(ema_state)
        self.monitor.info(f"resumed from {os.path.join(directory, tag)} at step {step}")

    def _check_resume(self, rank_state: dict, tag_dir: str) -> list:
        """The config against the checkpoint's, before DeepSpeed loads anything (README "Resuming a run"):
        a key that may not change is refused naming it; returns the changes to apply or log."""
        cfg = self.cfg
        step = int(ckpt.TAG_RE.match(os.path.basename(tag_dir)).group(1))
        if cfg.train.max_steps < step:
            raise ConfigError("train.max_steps", cfg.train.max_steps,
                              f"at least {step}, the step of checkpoint {tag_dir} (a resume cannot go back; start a "
                              "new run with another train.output_dir or checkpoint.resume=none)")
        saved = ckpt.saved_config(tag_dir)
        changes = [] if saved is None else ckpt.resume_changes(saved, cfg, tag_dir)
        written = rank_state.get("zero_stage")
        stage = self.engine.zero_optimization_stage()
        if written is not None and written != stage:
            key = "train.zero_stage" if cfg.train.zero_stage is not None else "train.deepspeed_config"
            raise ConfigError(key, cfg.train.zero_stage if key == "train.zero_stage" else cfg.train.deepspeed_config,
                              f"ZeRO stage {written}, the stage checkpoint {tag_dir} was written with (this run "
                              f"resolves to stage {stage}; DeepSpeed's optimizer files are per stage)")
        written = rank_state.get("grad_accum_steps")
        if written is not None and written != self.accum:
            raise ConfigError("train.grad_accum_steps", cfg.train.grad_accum_steps,
                              f"{written}, the gradient accumulation checkpoint {tag_dir} was written with (this "
                              f"run resolves to {self.accum}; the data position counts micro-batches)")
        self._check_eval_settings(rank_state.get("eval"), tag_dir)
        return [change for change in changes if change[3] in ("apply", "path")]

    def _optimizer_settings(self) -> tuple[list[dict], list[float]]:
        """The optimizer's hyperparameters (all but the parameters and the lr) and the lr schedule's base
        lrs, as this config built them."""
        groups = [{k: v for k, v in group.items() if k not in ("params", "lr")} for group in self.optimizer.param_groups]
        return groups, list(getattr(self.scheduler, "base_lrs", []))

    def _apply_optimizer_settings(self, fresh: tuple[list[dict], list[float]]) -> None:
        """After loading a checkpoint: this config's optim.* in place of the checkpoint's (DeepSpeed restores
        the saved param groups and schedule), the moments and the step counts kept. The lr of the current
        step is recomputed from the new base lr and schedule."""
        groups, base_lrs = fresh
        for group, settings in zip(self.optimizer.param_groups, groups):
            group.update(settings)
        scheduler = self.scheduler
        if scheduler is None:
            return
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            scheduler.base_lrs = base_lrs
            for group, base, factor in zip(scheduler.optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * factor(scheduler.last_epoch)
        else:  # a multiplicative schedule: scale the current lr by the change of the base lr
            for group, base, old in zip(scheduler.optimizer.param_groups, base_lrs, scheduler.base_lrs):
                group["lr"] = group["lr"] * base / old
            scheduler.base_lrs = base_lrs
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

    def _check_eval_settings(self, saved: dict | None, where: str) -> None:
        """A resumed run continues the checkpoint's evaluation curve, so it keeps the settings that define
        it (eval.every may change; a run without evaluation so far may start one)."""
        import dataclasses

        from engine.config import EVAL_CURVE_KEYS

        if not saved or not saved.get("every") or not self.cfg.eval.every:
            return
        now = dataclasses.asdict(self.cfg.eval)
        for key in EVAL_CURVE_KEYS:
            if key in saved and saved[key] != now[key]:
                raise ValueError(f"eval.{key}={now[key]!r} but checkpoint {where} continues an evaluation curve made "
                                 f"with {saved[key]!r}; allowed: {saved[key]!r} (or a new train.output_dir)")

    def rank_state(self) -> dict:
        """This rank's part of a checkpoint: data position, RNG streams, counters, the resolved settings a
        resume must match (copies: taken at a step boundary, it can be saved later as it was)."""
        import dataclasses

        return {"step": self.step, "data": self.loader.state_dict(), "rng": ckpt.rng_state(),
                "latent_generator": self.latent_generator.get_state(),
                "micro_attempts": self.micro_attempts, "nonfinite_total": self.nonfinite_total,
                "nonfinite_in_row": self.nonfinite_in_row, "precision": self.precision,
                "local_world_size": self.dist.local_world_size, "eval": dataclasses.asdict(self.cfg.eval),
                "zero_stage": self.engine.zero_optimization_stage(), "grad_accum_steps": self.accum,
                "wandb_run_id": self.monitor.wandb_run_id or self.wandb_run_id}

    def save(self, rank_state: dict | None = None) -> str:
        """Checkpoint the current step (collective). `rank_state`: this rank's state as `rank_state()` took
        it at this step's boundary (the default: now)."""
        rank_state = self.rank_state() if rank_state is None else rank_state
        ema_state = self.ema.full_state_dict()
        path = ckpt.save_checkpoint(self.engine, self.checkpoint_dir, self.step, self.cfg.to_dict(), rank_state,
                                    ema_state, self.cfg.checkpoint.keep_last)
        self.monitor.info(f"checkpoint {path}")
        return path

    # -- one micro-batch ----------------------------------------------------------------------

    def next_batch(self) -> dict:
        if self.cfg.train.debug_fixed_batch and self.fixed_batch is not None:
            return self.fixed_batch
        # Loading must not draw from the training RNG (torch's DataLoader seeds its workers from it when
        # an iterator starts), or a resumed run would see different noise than an uninterrupted one.
        with torch.random.fork_rng(devices=[]):
            if self._data_iter is None:
                self._data_iter = iter(self.loader)
            try:
                batch = next(self._data_iter)
            except StopIteration:
                self._data_iter = iter(self.loader)
                batch = next(self._data_iter)
        if self.cfg.train.debug_fixed_batch:
            self.fixed_batch = batch
        return batch

    def prepare(self, batch: dict):
        """(latents x, labels, encoder targets, REG class target) for one micro-batch."""
        from engine.models.latents import sample_posterior

        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        with torch.no_grad():
            features = [encoder(images) for encoder in self.encoders]
            if "latent_mean" in batch:
                mean, std = batch["latent_mean"].to(self.device), batch["latent_std"].to(self.device)
                if batch.get("latent_raw"):  # raw posterior moments: latent.scale / latent.shift applied here
                    mean, std = self.latent_space.normalise(mean, std)
            else:
                mean, std = self.latent_space.encode(images)
            x = sample_posterior(mean.float(), std.float(), self.latent_generator)
        z_targets = [tokens.to(self.model_dtype) for tokens, _ in features]
        cls_target = features[0][1] if self.cfg.model.reg else None
        return x.to(self.model_dtype), labels, z_targets, cls_target

    def forward_losses(self, batch: dict, mark=None) -> dict:
        x, labels, z_targets, cls_target = self.prepare(batch)
        if mark is not None:
            mark("encoder")
        self._inputs = (x, z_targets)  # kept (not copied) to name the cause of a non-finite loss
        return self.transport.training_losses(self.engine, x, labels, z_targets, cls_target)

    def _nonfinite_cause(self, batch: dict) -> str | None:
        x, z_targets = self._inputs
        inputs = {f"{name} in the latent shards (data.latents_root)": batch[name]
                  for name in ("latent_mean", "latent_std") if name in batch}
        if not inputs:
            inputs[f"latents from latent.kind={self.cfg.latent.kind!r}"] = x
        inputs.update({f"features of encoders[{i}] ({self.cfg.encoders[i].name})": z for i, z in enumerate(z_targets)})
        return nonfinite_inputs(batch, inputs)

    # -- one optimizer step -------------------------------------------------------------------

    TERMS = ("loss", "velocity", "alignment", "cls")

    def train_step(self, mark=None) -> dict:
        """Accumulate `accum` finite micro-batches and take one optimizer step. Returns the step's
        mean loss terms over micro-batches and ranks.

        `mark(phase)`, where given, is called as each phase ends (bench.train_step times them; it
        changes no number): per micro-batch "data" (the batch drawn), "encoder" (the encoders' targets
        and the latents), "forward" (model, losses and the ranks' finite-loss check, a host sync),
        "backward"; then once "optimizer" (engine.step, the EMA update, the gradient norm read)."""
        mark = mark or (lambda phase: None)
        self.engine.train()
        lr = float(self.scheduler.get_last_lr()[0]) if self.scheduler is not None else self.cfg.optim.lr  # this step's
        totals = torch.zeros(len(self.TERMS), dtype=torch.float64)
        done = 0
        skipped_before = self.engine.skipped_steps
        while done < self.accum:
            batch = self.next_batch()
            mark("data")
            attempt = self.micro_attempts
            self.micro_attempts += 1
            if self.cfg.train.cuda_graphs:  # a new iteration: the previous step's graph outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            losses = self.forward_losses(batch, mark)
            if attempt in self.cfg.train.debug_nonfinite_steps:
                losses["loss"] = losses["loss"] * float("nan")
            values = torch.stack([losses[k].detach().float().reshape(()) for k in self.TERMS])
            finite = torch.isfinite(values)
            # one all-reduce and one host sync: the sum of each term over ranks, and how many ranks saw
            # a non-finite loss
            packed = torch.cat([torch.where(finite, values, torch.zeros_like(values)),
                                (~finite).any().float().reshape(1)]).to(self.device)
            dist.all_reduce(packed)
            packed = packed.cpu()
            mark("forward")
            if packed[-1] > 0:
                self.nonfinite_total += 1
                self.nonfinite_in_row += 1
                here = not bool(finite.all())
                cause = self._nonfinite_cause(batch) if here else None
                where = cause or ("this rank's inputs are finite (the model or the loss diverged)" if here
                                  else "this rank's loss is finite")
                self.monitor.warn(f"step {self.step + 1}: non-finite loss on {int(packed[-1])} rank(s) "
                                  f"({dict(zip(self.TERMS, values.tolist()))}); {where}; micro-batch skipped "
                                  f"({self.nonfinite_in_row} in a row, {self.nonfinite_total} in total)")
                if self.nonfinite_in_row >= self.cfg.train.max_nonfinite_in_row:
                    raise NonFiniteLossError(f"{self.nonfinite_in_row} non-finite losses in a row "
                                             f"(train.max_nonfinite_in_row={self.cfg.train.max_nonfinite_in_row})"
                                             + (f"; last: {cause}" if cause else ""))
                continue
            self.nonfinite_in_row = 0
            self.engine.backward(losses["loss"])
            mark("backward")
            self.engine.step()
            totals += packed[:-1].double() / self.world_size
            done += 1
        self.step += 1
        if self.weight_copies is not None and not self.copies_written_by_optimizer:
            self.weight_copies.refresh()  # after the real step only (engine.step() is a no-op between micro-batches)
        self.ema.update()
        out = {k: float(v) / self.accum for k, v in zip(self.TERMS, totals)}
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None and self.clip_optimizer is not None:  # no ZeRO: the optimizer took the norm
            grad_norm = self.clip_optimizer.last_grad_norm
        out["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        if self.engine.skipped_steps > skipped_before or self._optimizer_skipped(out["grad_norm"]):
            out["grad_norm"] = float("inf")  # DeepSpeed's report of an overflow
            self.monitor.warn(f"step {self.step}: non-finite gradients; optimizer step skipped "
                              f"({self.engine.skipped_steps} in total)")
        out["lr"] = lr
        out["nonfinite_total"] = self.nonfinite_total
        out["optimizer_skipped_total"] = self.engine.skipped_steps
        mark("optimizer")
        return out

    def _optimizer_skipped(self, grad_norm: float) -> bool:
        """Whether ClippedAdamW skipped this step on the device (a non-finite norm, or DeepSpeed's -1
        sentinel for one, with DeepSpeed's bf16 overflow check off: engine.config). DeepSpeed then took
        it for a step: it is told as its own check would have told it (skipped_steps, the lr schedule
        not advanced), so the run goes on as under DeepSpeed's check."""
        if self.clip_optimizer is None or (math.isfinite(grad_norm) and grad_norm >= 0):
            return False
        self.engine.skipped_steps += 1
        scheduler = self.scheduler
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            scheduler.last_epoch -= 1
            for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * factor(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
        elif scheduler is not None:
            raise TypeError(f"a skipped optimizer step with lr scheduler {type(scheduler).__name__} (known: LambdaLR)")
        return True

    # -- the run ------------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train to train.max_steps (or train.max_minutes); a lost peer raises PeerLostError."""
        try:
            return self._fit()
        except Exception as error:
            if self.world_size == 1 or not is_collective_failure(error):
                raise
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            try:
                latest = ckpt.latest_tag(self.checkpoint_dir)
            except OSError:
                latest = None
            raise PeerLostError(
                f"rank {self.rank} of {self.world_size} (local rank {self.dist.local_rank}) lost a peer at step "
                f"{self.step + 1}: a collective failed or waited longer than train.collective_timeout_s="
                f"{self.cfg.train.collective_timeout_s:g} ({type(error).__name__}: {first[:300]}); another rank "
                f"died, hung or lost its network. Restart every node with the same command: the run resumes from "
                f"the last complete checkpoint ({latest or 'none yet: from the start'})") from error

    def _fit(self) -> dict:
        cfg = self.cfg
        start_step, start_time = self.step, time.time()
        if self.evaluator is not None and cfg.eval.at_start and self.step == 0:
            self.evaluate()  # the curve's origin: the untrained model
        self.monitor.start(self.step, cfg.train.max_steps, wandb_run_id=self.wandb_run_id)
        stopped_early = False
        self._good_state = self.rank_state()  # the last step boundary: what a save after a failure writes
        self._backwards = 0
        try:
            while self.step < cfg.train.max_steps:
                t0 = time.time()
                self._backwards = 0
                metrics = self.train_step(mark=self._count_backward)
                self._good_state = self.rank_state()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                step_time = time.time() - t0
                images_per_s = cfg.train.global_batch_size / step_time
                metrics.update(step_time=step_time, images_per_s=images_per_s,
                               tflops_per_rank=3 * self.flops_per_sample * images_per_s / self.world_size / 1e12,
                               data_skipped=self.loader.skipped, data_nonfinite_dropped=self.loader.dropped_nonfinite)
                if self.device.type == "cuda":
                    metrics["memory_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
                self.monitor.log_step(self.step, metrics)
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.train.max_steps:
                    self.save()
                if cfg.logging.sample_every and self.step % cfg.logging.sample_every == 0:
                    self.sample_grid(f"samples_step{self.step:08d}.png")
                if self.evaluator is not None and self.step % cfg.eval.every == 0:
                    self.evaluate()
                if cfg.train.max_minutes is not None and self._should_stop(start_time):
                    stopped_early = True
                    self.monitor.info(f"train.max_minutes={cfg.train.max_minutes} reached at step {self.step}")
                    break
        except Exception as error:
            self._save_after_failure(error)
            raise
        finally:
            self.monitor.close_bar()
        if self.step > start_step or not ckpt.list_checkpoints(self.checkpoint_dir):
            self.save()
        results = {"step": self.step, "stopped_early": stopped_early, "nonfinite_total": self.nonfinite_total}
        if self.evaluator is not None:
            metrics = self.last_eval if self.last_eval_step == self.step else self.evaluate()
            if self.is_main:
                from engine.evaluate import format_quality
                results["eval"] = metrics
                self.monitor.info(f"quality of the final EMA model (step {self.step}): {format_quality(metrics)}")
        if cfg.sample.num_images > 0:
            results.update(self.final_samples())
        if self.is_main:
            results["loss_curve"] = self.monitor.loss_curve()
        self.monitor.close()
        return results

    def _count_backward(self, phase: str) -> None:
        if phase == "backward":
            self._backwards += 1

    def _save_after_failure(self, error: Exception) -> None:
        """A run stopped by an error after training began first saves the last good state (the last
        completed step, exactly as a checkpoint at that step), where that is safe: every rank stopped
        together (too many non-finite losses in a row: the ranks agree on each loss), or the run has one
        rank; and the error did not come from the optimizer update (the weights could be half-stepped)
        or from writing a checkpoint. Otherwise it says why not. A failure of this save is logged; the
        original error is raised either way."""
        good = self._good_state
        step = good["step"]
        try:
            saved = ckpt.latest_tag_or_none(self.checkpoint_dir)
        except OSError:
            saved = None
        if step == 0 or saved == ckpt.tag_for(step):
            return  # nothing trained since the last checkpoint
        reason = None
        if isinstance(error, (ckpt.CheckpointWriteError, PeerLostError)) or is_collective_failure(error):
            reason = "the error came from writing a checkpoint or from a lost peer"
        elif not isinstance(error, NonFiniteLossError) and self.world_size > 1:
            reason = "the other ranks may be waiting in a collective"
        elif self._backwards >= self.accum or self.step != step:
            reason = "it came during the optimizer update"
        if reason is not None:
            self.monitor.warn(f"{type(error).__name__} at step {self.step + 1}: the last good state (step {step}) is "
                              f"not saved: {reason}; the last checkpoint is {saved or 'none'}")
            return
        self.monitor.warn(f"{type(error).__name__} at step {self.step + 1}: saving the last good state (step {step}) "
                          "before stopping")
        try:
            path = self.save(rank_state=good)
        except Exception as failure:  # noqa: BLE001 (the original error is the one to raise)
            self.monitor.warn(f"the last good state (step {step}) could not be saved: {failure}")
            return
        self.monitor.warn(f"saved the last good state as {path}: a resume continues from step {step} (with "
                          "the changes the resume policy applies, such as a lower optim.lr)")

    def _should_stop(self, start_time: float) -> bool:
        # Every rank must take the same decision: rank 0's clock decides.
        flag = torch.tensor([1.0 if time.time() - start_time > 60 * self.cfg.train.max_minutes else 0.0],
                            device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    # -- sampling -----------------------------------------------------------------------------

    last_eval, last_eval_step = None, None

    @contextlib.contextmanager
    def training_rng_untouched(self):
        """Evaluation draws random numbers (a model's initialisation, a random test Inception, the probe,
        sampling noise) from the global generators; the training steps after it must draw exactly what
        they would without it (tests/engine/test_numerics_frozen.py runs the main job with eval on)."""
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            try:
                yield
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)

    def evaluate(self) -> dict | None:
        """eval.*: the EMA model's samples scored over all ranks (collective); rank 0 logs the metrics
        (TensorBoard, eval.jsonl, the loss-curve figure) and returns them."""
        from engine.evaluate import format_quality
        from engine.models import build_model

        started = time.time()
        with self.training_rng_untouched():
            model = build_model(self.cfg.model)
            model.load_state_dict(self.ema.full_state_dict(), strict=True)
            metrics = self.evaluator.evaluate(model.to(self.device).eval())
        del model
        self.last_eval, self.last_eval_step = metrics, self.step
        if self.is_main:
            metrics["eval_seconds"] = time.time() - started
            self.monitor.log_eval(self.step, metrics)
            self.monitor.info(f"eval at step {self.step} ({self.cfg.eval.num_images} EMA samples, "
                              f"{metrics['eval_seconds']:.0f} s): {format_quality(metrics)}")
        return metrics

    def _sampling_model(self):
        """A plain fp32 model with the EMA weights on rank 0 (None elsewhere); collective."""
        from engine.models import build_model

        state = self.ema.full_state_dict()
        if not self.is_main:
            return None
        model = build_model(self.cfg.model)
        model.load_state_dict(state, strict=True)
        return model.to(self.device).eval()

    def sample_grid(self, name: str) -> str | None:
        from engine.images import generate, save_grid

        model = self._sampling_model()
        if model is None:
            return None
        n = self.cfg.sample.grid_images
        labels = torch.arange(n) % self.cfg.model.num_classes
        images = generate(model, self.latent_space, labels, self.cfg, self.device)
        path = os.path.join(self.output_dir, name)
        save_grid(images, path, nrow=min(n, self.cfg.model.num_classes))  # one column per class
        self.monitor.image(name, path, self.step)
        return path

    def final_samples(self) -> dict:
        from engine.images import generate, save_grid, save_npz

        model = self._sampling_model()
        if model is None:
            return {}
        n = self.cfg.sample.num_images
        labels = torch.arange(n) % self.cfg.model.num_classes
        images = generate(model, self.latent_space, labels, self.cfg, self.device)
        grid = os.path.join(self.output_dir, "samples.png")
        npz = os.path.join(self.output_dir, "samples.npz")
        save_grid(images[: self.cfg.sample.grid_images], grid, nrow=min(n, self.cfg.model.num_classes))
        save_npz(images, labels, npz)
        self.monitor.info(f"samples: {grid}, {npz} ({n} images)")
        return {"samples_png": grid, "samples_npz": npz}
