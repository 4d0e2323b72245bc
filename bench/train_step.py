"""End-to-end training-step benchmark: AlignFlow against the reference PyTorch path, side by side.

    python -m bench.train_step [--model SiT-XL/2] [--batch 32] [--resolution 256] [--budget-s S] [--smoke] [--out DIR]

One process, one device, the same model, data, optimiser and precision policy (bf16 autocast, fp32
weights, fused AdamW: REPA's, and the trainer's `train.precision: bf16-mixed`) for every variant:
  1. reference eager     kernels backend "torch" (PyTorch ops, SDPA attention), as the REPA code runs,
                         and REPA's encoder path (`fused: false`: fp32 weights under autocast, SDPA)
  2. reference compiled  the same under torch.compile (the SiT; the encoder eager, as REPA runs it)
  3. alignflow           the fused Triton kernels and the fused encoder (bf16 weights cast once,
                         attention on kernels.attention_qkv)
  4. alignflow compiled  the fused kernels under torch.compile, the fused encoder compiled too
  5. alignflow graphs    the same with torch.compile mode "reduce-overhead": Inductor's CUDA graphs over
                         the encoder's forward, the SiT's forward and its backward (opt-in)
  alignflow and alignflow compiled clip the gradients inside the fused AdamW step (the trainer's
  optim.fused_clip, engine/optim.py); alignflow-separate-clip is alignflow with the reference's
  clip_grad_norm_ then AdamW, so the pair measures that switch alone; alignflow-bf16-copies is
  alignflow whose matmuls read bf16 copies of the weights that the optimizer writes after its step
  (the trainer's train.bf16_weight_copies) instead of autocast's casts at every forward;
  alignflow-graphs-all is alignflow-graphs with every switch on (the bf16 copies, which also take the
  matmuls' weight gradients in bf16, train.bf16_weight_grads, and the CUDA C++ AdamW kernel,
  optim.step_kernel alignflow), alignflow-graphs-all-fp32-grads the same with fp32 weight gradients
and the trainer's own step, `engine.trainer.Trainer.train_step` as `deepspeed --num_gpus 1 --module
engine.train` runs it: the DeepSpeed engine with configs/deepspeed/zero2.json (ZeRO-2), its AdamW,
gradient clipping and EMA update, the finite-loss all-reduce and host sync, its loader over the same
JPEG files with pre-extracted latent shards (random-weight encoder as above; the shards hold an 8x8
average pool of each image, written once by engine.preprocess: SD-VAE's 4 x H/8 x W/8 grid):
  6. trainer-bf16            train.precision bf16: bf16 weights, fp32 masters in the ZeRO optimizer
  7. trainer-bf16-mixed      train.precision bf16-mixed: fp32 weights, the model under bf16 autocast
  8. trainer-bf16-mixed-zero0  trainer-bf16-mixed with train.zero_stage 0 (no ZeRO: the optimizer is the
                             trainer's own ClippedAdamW, no gradient hooks or flat buffers; TRAINER_ZERO_STAGES)
  9. trainer-bf16-zero1      trainer-bf16 with train.zero_stage 1 (the trainer runs bf16 weights under ZeRO only)
 10. trainer-bf16-compiled   trainer-bf16 with train.compile (DeepSpeed's engine.compile, inductor)
 11. trainer-bf16-graphs     trainer-bf16-compiled with train.cuda_graphs (opt-in)
Reported per variant: steady-state img/s, the step split into data / encoder / forward+loss / backward /
optimizer (CUDA events; the trainer's fwd+loss includes its finite-loss check, its optimizer the
EMA update and the gradient-norm read), peak memory, the host syncs of one step (torch's sync debug mode), model
TFLOP/s from the analytic counts (`SiT.flops_per_sample`, and bench/flops.py for the encoder) and MFU
against the bf16 matmul rate measured in the same run; on a GPU also one more step under torch.profiler
(bench/profile.py: how long the GPU was busy and idle in it, device time per kind of kernel;
`--no-profile` leaves it out).

Images and labels come from the trainer's own loader (`--loader`, by default the trainer's `auto`:
DALI nvJPEG on a GPU where installed, else the PIL DataLoader) over JPEG files of the built-in set at
twice the resolution, so "data" is the time the step waited for its batch beyond what the loader had
prefetched; `--loader none` feeds one fixed batch instead. Latents are random (B, 4, H/8, W/8) tensors,
as pre-extracted latent shards would give. A data section times the loaders alone on the same JPEG
files (DALI GPU and CPU decode, PIL DataLoader): img/s and CPU cores used.

Writes bench/results/train_step-<device>-<date>.json (rewritten after every variant, so a run cut short
keeps what it measured) and prints its table (`python -m bench.report` writes it beside the JSON). The
variants run most informative first (ORDER): the eager pair, the compiled pair, alignflow-graphs and
alignflow-graphs-all (each compile of SiT-XL/2 takes a minute or more), the trainer's steps, then the
variants that differ from alignflow by one switch; with a time
budget (`--budget-s`, or ALIGNFLOW_DEADLINE from bench/gpu_all.sh) a variant that would start after it
is recorded as skipped. `--smoke` runs a tiny model for two steps on the CPU so CI keeps the harness
working; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import tempfile
import time

import torch

from bench.common import Deadline, environment, measure_matmul_flops, write_json, write_results
from bench.data import loader_rows, loader_table
from bench.flops import training_step_flops, vit_forward_flops
from bench.profile import markdown_rows, profile_step


# the benchmark's own step: name -> (kernels backend, torch.compile: False, True or its mode)
GRAPHS = "reduce-overhead"  # torch.compile's mode with Inductor's CUDA graphs (train.cuda_graphs)
VARIANTS = {"reference-eager": ("torch", False), "alignflow": ("triton", False),
            "alignflow-separate-clip": ("triton", False), "alignflow-bf16-copies": ("triton", False),
            "alignflow-adamw-kernel": ("triton", False),
            "reference-compiled": ("torch", True), "alignflow-compiled": ("triton", True),
            "alignflow-graphs": ("triton", GRAPHS), "alignflow-graphs-all": ("triton", GRAPHS),
            "alignflow-graphs-all-fp32-grads": ("triton", GRAPHS)}
# the benchmark's variants that turn one of alignflow's SiT switches off (config key: value), so that each
# switch is measured against alignflow in the same run
SWITCH_OFF_VARIANTS = {"alignflow-no-batched-modulation": {"batched_modulation": False},
                       "alignflow-no-fused-bias-grad": {"fused_bias_grad": False},
                       "alignflow-no-fused-gelu": {"fused_gelu": False}}
VARIANTS.update(dict.fromkeys(SWITCH_OFF_VARIANTS, ("triton", False)))
# the benchmark's variants whose optimizer clips inside the fused AdamW step (engine.optim.ClippedAdamW,
# the trainer's optim.fused_clip); the others run REPA's clip_grad_norm_ then fused AdamW.
# alignflow-separate-clip is alignflow with the reference optimizer: the pair measures the switch
FUSED_CLIP_VARIANTS = ("alignflow", "alignflow-compiled", "alignflow-graphs", "alignflow-bf16-copies",
                       "alignflow-adamw-kernel", "alignflow-graphs-all", "alignflow-graphs-all-fp32-grads",
                       *SWITCH_OFF_VARIANTS)
# the benchmark's variants whose matmuls read persistent bf16 copies of the weights, written by ClippedAdamW in
# its step, instead of autocast's casts (engine/bf16_copies.py, the trainer's train.bf16_weight_copies): with
# alignflow the pair measures that switch alone
BF16_COPIES_VARIANTS = ("alignflow-bf16-copies", "alignflow-graphs-all", "alignflow-graphs-all-fp32-grads")
# the benchmark's variants whose ClippedAdamW steps with AlignFlow's CUDA C++ AdamW kernel (csrc/adamw.cu, the
# trainer's optim.step_kernel alignflow: no gradient written back, the bf16 copies written in its own pass)
# instead of torch's fused one; a variant whose kernel is not built is skipped, saying so. alignflow-graphs-all
# is alignflow-graphs with every switch on (bf16 copies, this kernel): the step bench.model ranks fastest;
# trainer-bf16-mixed-zero0-graphs-all the trainer's one-GPU run with every switch on (ZeRO-0, train.cuda_graphs,
# its 'auto' bf16 copies, optim.step_kernel alignflow)
ADAMW_KERNEL_VARIANTS = ("alignflow-adamw-kernel", "alignflow-graphs-all", "alignflow-graphs-all-fp32-grads",
                         "trainer-bf16-mixed-zero0-graphs-all")
# the benchmark's variants whose bf16 copies take the matmuls' weight gradients in bf16, read by the AdamW kernel
# (engine/bf16_copies.py grads, the trainer's train.bf16_weight_grads, which is 'auto' in
# trainer-bf16-mixed-zero0-graphs-all): alignflow-graphs-all-fp32-grads is alignflow-graphs-all without it, the pair
# measures that switch alone
BF16_GRADS_VARIANTS = ("alignflow-graphs-all",)
# the trainer's step: name -> (train.precision, train.compile, or GRAPHS for train.cuda_graphs too); its kernels
# backend is the trainer's "auto"
TRAINER_VARIANTS = {"trainer-bf16": ("bf16", False), "trainer-bf16-mixed": ("bf16-mixed", False),
                    "trainer-bf16-mixed-zero0": ("bf16-mixed", False),
                    "trainer-bf16-mixed-zero0-graphs-all": ("bf16-mixed", GRAPHS),
                    "trainer-bf16-zero1": ("bf16", False),
                    "trainer-bf16-compiled": ("bf16", True), "trainer-bf16-graphs": ("bf16", GRAPHS)}
# the trainer's variants at another train.zero_stage than zero2.json's 2: name -> stage. At world size 1 ZeRO
# partitions nothing, and bench.trainer_host measured its host work (SiT-XL/2's parameter tensors at a tiny
# width, on the CPU): ZeRO-0 (bf16-mixed; bf16 weights do not run without ZeRO) and ZeRO-1 (bf16) issue less
# than ZeRO-2; these measure it on a GPU (bench.model models ZeRO-2 and, for the two -zero0 rows, stage 0)
TRAINER_ZERO_STAGES = {"trainer-bf16-mixed-zero0": 0, "trainer-bf16-mixed-zero0-graphs-all": 0,
                       "trainer-bf16-zero1": 1}
# the order in which they run, most informative first (a time budget skips the tail): the eager pair, the
# compiled pair and CUDA graphs, alone and with every switch (the first H200 run's old order ran out of time
# before alignflow-compiled),
# the trainer's step, then the variants that differ from alignflow by one switch
ORDER = ["reference-eager", "alignflow", "reference-compiled", "alignflow-compiled", "alignflow-graphs",
         "alignflow-graphs-all",
         "trainer-bf16", "trainer-bf16-mixed", "trainer-bf16-mixed-zero0", "trainer-bf16-mixed-zero0-graphs-all",
         "trainer-bf16-zero1",
         "trainer-bf16-compiled", "trainer-bf16-graphs",
         "alignflow-separate-clip", "alignflow-bf16-copies", "alignflow-adamw-kernel", *SWITCH_OFF_VARIANTS,
         "alignflow-graphs-all-fp32-grads"]


def _compile_mode(use_compile) -> dict:
    return {"mode": use_compile} if isinstance(use_compile, str) else {}
PHASES = ("data", "encoder", "forward", "backward", "optimizer")


def build(args, device, model_overrides=None):
    """The step's parts: (encoder, SiT config, transport, encoder FLOPs per image). `model_overrides`: SiT
    config keys set over the preset's (bench.trainer_host: SiT-XL/2's depth and heads at a tiny width;
    --smoke: a narrow 2-block SiT); --smoke (or `model_overrides`) takes a tiny random-weight encoder."""
    from engine.models import ModelConfig
    from engine.models.encoders import EncoderConfig, build_encoder
    from engine.transport import Transport, TransportConfig

    if args.smoke or model_overrides is not None:
        encoder_cfg = EncoderConfig(name="vit_tiny_patch16_224", pretrained=False, resolution=args.resolution,
                                    image_size=32)
    else:
        encoder_cfg = EncoderConfig(name=args.encoder, pretrained=False, resolution=args.resolution)
    encoder = build_encoder(encoder_cfg, device=device)
    images = torch.randint(0, 256, (args.batch, 3, args.resolution, args.resolution), dtype=torch.uint8,
                           device=device)  # only to count the encoder's tokens
    with torch.no_grad():
        tokens, _ = encoder(images)
    overrides = dict(model_overrides or (dict(hidden_size=64, depth=2, num_heads=2) if args.smoke else {}))
    model_cfg = ModelConfig(name=args.model, input_size=args.resolution // 8, num_classes=1000,
                            encoder_depth=min(args.encoder_depth, overrides.get("depth", 99)),
                            z_dims=[encoder.embed_dim], reg=args.reg, car_flow=args.car_flow, **overrides)
    if tokens.shape[1] != model_cfg.num_patches:
        raise SystemExit(f"encoder gives {tokens.shape[1]} tokens, the model has {model_cfg.num_patches} patches")
    vit = encoder.model if hasattr(encoder, "model") else encoder
    encoder_flops = vit_forward_flops(encoder.embed_dim, len(vit.blocks), tokens.shape[1] + 1,
                                      vit.patch_embed.patch_size[0])
    return encoder, model_cfg, Transport(TransportConfig(time_sampling="lognormal")), encoder_flops


def loader_config(args):
    """The data section of every variant: the built-in set's JPEG files at twice the resolution, one
    epoch long enough for a variant's steps (each variant starts an epoch of its own)."""
    from engine.data import DataConfig

    cores = os.cpu_count() or 1
    batches = args.warmup + args.steps + 3  # the plan covers what the loader decodes ahead, and the sync count
    root = os.path.join(tempfile.gettempdir(), f"alignflow-train-bench-{args.resolution}")
    return DataConfig(source="builtin", root=root, resolution=args.resolution, num_classes=10, batch_size=args.batch,
                      decoder=args.loader if args.loader in ("pil", "dali") else "auto", num_workers=min(cores, 8),
                      num_threads=min(cores, 8), builtin_images_per_class=-(-batches * args.batch // 10),
                      builtin_image_size=2 * args.resolution)


def build_loader(args, device):
    """The trainer's loader over `loader_config`'s files, or None for `--loader none`."""
    if args.loader == "none":
        return None
    from engine.data import build_loader as build

    return build(loader_config(args), rank=0, world_size=1, device=device)


def _batches(loader, epoch, args, device):
    """(images, labels) batches: the loader's epoch `epoch`, or one fixed random batch without a loader."""
    if loader is None:
        images = torch.randint(0, 256, (args.batch, 3, args.resolution, args.resolution), dtype=torch.uint8,
                               device=device)
        labels = torch.randint(0, 1000, (args.batch,), device=device)
        while True:
            yield images, labels
    loader.set_epoch(epoch)
    for batch in loader:
        yield batch["image"], batch["label"]
    raise RuntimeError(f"the loader's epoch of {len(loader)} batches ran out before the timed steps did")


def _timer(device):
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _elapsed(device, a, b) -> float:
    if device.type == "cuda":
        b.synchronize()
        return a.elapsed_time(b) / 1e3
    return b - a


def timed_steps(step, args, device, clock=None):
    """Run `step(mark)` args.warmup + args.steps times; `step` calls `mark(phase)` as each of PHASES
    ends (a phase marked twice in a step, as with gradient accumulation, is summed). Returns the row's
    timing fields (medians over the timed steps, the peak memory since the first step) and the last
    step's return value. Phases are timed on the device (CUDA events; wall time on the CPU), or with
    `clock` (seconds, e.g. time.process_time: bench.trainer_host's host time) where given."""
    if clock is None:
        timer, elapsed = (lambda: _timer(device)), (lambda a, b: _elapsed(device, a, b))
    else:
        timer, elapsed = clock, (lambda a, b: b - a)
    timings = {k: [] for k in PHASES + ("step",)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        marks = [(None, timer())]
        out = step(lambda phase: marks.append((phase, timer())))
        if i < args.warmup:
            continue
        spent = dict.fromkeys(PHASES, 0.0)
        for (_, a), (phase, b) in zip(marks, marks[1:]):
            spent[phase] += elapsed(a, b)
        for phase in PHASES:
            timings[phase].append(spent[phase])
        timings["step"].append(elapsed(marks[0][1], marks[-1][1]))
    median = {k: sorted(v)[len(v) // 2] for k, v in timings.items()}
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"seconds_per_step": median["step"], "breakdown_seconds": median, "img_per_s": args.batch / median["step"],
            "peak_memory_bytes": peak}, out


def reference_encoder(encoder):
    """The reference variants' encoder: REPA's path (`fused: false`: fp32 weights cast by autocast on every
    call, timm's SDPA attention) with `encoder`'s weights, on its device."""
    from engine.models.encoders import build_encoder

    reference = build_encoder(dataclasses.replace(encoder.cfg, fused=False), device=encoder.mean.device)
    reference.model.load_state_dict({k: v.float() for k, v in encoder.model.state_dict().items()})
    reference.low_precision_devices = encoder.low_precision_devices
    return reference


@contextlib.contextmanager
def variant_encoder(encoder, backend, use_compile):
    """The encoder a variant runs: the reference one for the "torch" backend; the fused one otherwise,
    compiled (after its one-time bf16 cast, `dynamic=False`) in the compiled variants, as the trainer
    compiles it under `train.compile` on a GPU."""
    if backend == "torch":
        yield reference_encoder(encoder)
        return
    if use_compile and encoder.mean.is_cuda:
        encoder.compile_features(dynamic=False, **_compile_mode(use_compile))
    try:
        yield encoder
    finally:
        encoder.compile_features(False)


def make_optimizer(params, fused_clip: bool, device, step_kernel: str = "torch"):
    """The step's optimizer: REPA's AdamW (fused on CUDA; clip_grad_norm_ before it in one_step), or
    with `fused_clip` engine.optim.ClippedAdamW (the clip inside the step; `step_kernel`: torch's fused
    AdamW kernel or "alignflow", csrc/adamw.cu)."""
    adamw = dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    if fused_clip:
        from engine.optim import ClippedAdamW

        return ClippedAdamW(params, max_norm=CLIP, step_kernel=step_kernel, **adamw)
    return torch.optim.AdamW(params, fused=device.type == "cuda", **adamw)


CLIP = 1.0  # max gradient norm, REPA's


def _step_kernel(name, device) -> str:
    """The variant's optim.step_kernel: "alignflow" for ADAMW_KERNEL_VARIANTS, where it raises, naming why,
    if csrc/adamw.cu cannot run on `device` (the variant is then skipped); else "torch"."""
    if name not in ADAMW_KERNEL_VARIANTS:
        return "torch"
    from kernels import _cuda

    try:
        _cuda.library("adamw", device)
    except (RuntimeError, OSError) as error:
        raise RuntimeError(f"the CUDA AdamW kernel is not available: {str(error).splitlines()[0]}") from None
    return "alignflow"


def _adamw_launches() -> int:
    from kernels import _cuda

    return _cuda.launches["adamw_step"]


def _check_kernel_ran(name, step_kernel, launched) -> None:
    """Raise where an AdamW-kernel variant's steps never launched the kernel: a fallback is not timed as it."""
    from kernels import _cuda

    if step_kernel == "alignflow" and _adamw_launches() == launched:
        raise RuntimeError(f"{name}: the CUDA AdamW kernel never ran (kernels fell back: {sorted(_cuda._logged)})")


def run_variant(name, backend, use_compile, args, device, parts, loader, epoch):
    with variant_encoder(parts[0], backend, use_compile) as encoder:
        return _run_variant(name, backend, use_compile, args, device, (encoder, *parts[1:]), loader, epoch)


def _run_variant(name, backend, use_compile, args, device, parts, loader, epoch):
    from engine.models import build_model

    encoder, model_cfg, transport, _ = parts
    step_kernel = _step_kernel(name, device)
    model_cfg = dataclasses.replace(model_cfg, **SWITCH_OFF_VARIANTS.get(name, {}))
    torch.manual_seed(0)
    model = build_model(model_cfg).to(device).train()
    optimizer = make_optimizer(model.parameters(), name in FUSED_CLIP_VARIANTS, device, step_kernel)
    launched = _adamw_launches()
    if name in BF16_COPIES_VARIANTS:
        from engine.bf16_copies import WeightCopies

        copies = WeightCopies(model, grads=name in BF16_GRADS_VARIANTS)
        optimizer.set_bf16_copies(copies.mapping())
        if copies.grads:
            optimizer.set_gradient_source(copies)
    forward = torch.compile(model, **_compile_mode(use_compile)) if use_compile else model
    latents = torch.randn(args.batch, 4, args.resolution // 8, args.resolution // 8, device=device)
    batches = _batches(loader, epoch, args, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    step_inputs = (model, forward, optimizer, encoder, transport, latents, model_cfg, autocast, backend)
    last = {}

    def step(mark):
        if use_compile == GRAPHS:  # a new iteration for the CUDA graph trees (the trainer does the same)
            torch.compiler.cudagraph_mark_step_begin()
        last["images"], last["labels"] = next(batches)
        mark("data")
        phases = iter(PHASES[1:])
        return one_step(*step_inputs, last["images"], last["labels"], mark=lambda: mark(next(phases)))

    row, losses = timed_steps(step, args, device)
    if not torch.isfinite(losses["loss"]):
        raise RuntimeError(f"{name}: non-finite loss {losses['loss'].item()}")
    _check_kernel_ran(name, step_kernel, launched)

    def counted_step():
        if use_compile == GRAPHS:
            torch.compiler.cudagraph_mark_step_begin()
        return one_step(*step_inputs, last["images"], last["labels"])

    host_syncs = (_count_host_syncs(counted_step)
                  if device.type == "cuda" else None)
    return {"variant": name, **row, "host_syncs_per_step": host_syncs, "final_loss": float(losses["loss"].detach()),
            **_device_profile(counted_step, args)}


def _device_profile(step, args) -> dict:
    """{"device_profile": bench.profile's summary of one more step} on a GPU unless --no-profile; a
    profile that fails is reported, the timed row kept."""
    if not args.profile or not torch.cuda.is_available():
        return {}
    try:
        return {"device_profile": profile_step(step)}
    except Exception as error:
        return {"device_profile_error": f"{type(error).__name__}: {str(error)[:200]}"}


def pool_autoencoder(cfg):
    """The trainer variants' latent space (`latent.kind: module`): SD-VAE's grid (4 channels, 8x
    downsampling) from an 8x8 average pool of RGB plus their mean, posterior std 0.1 |mean|. It only
    writes the latent shards once; the timed step reads them, as the public recipe does."""
    import torch.nn.functional as F

    class PoolAutoencoder(torch.nn.Module):
        channels, downsample = 4, 8

        def encode(self, x):
            pooled = F.avg_pool2d(x, 8)
            mean = torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)
            return mean, 0.1 * mean.abs()

        def decode(self, z):
            return F.interpolate(z[:, :3], scale_factor=8, mode="nearest")

    return PoolAutoencoder()


POOL_LATENTS = "bench.train_step:pool_autoencoder"


def latent_shards(args, device) -> str:
    """Latent shards of the variants' JPEG files (engine.preprocess with `pool_autoencoder`), written
    once per data set beside it; returns their root."""
    from engine.preprocess import encoder_from_latent_space, latent_config, preprocess

    data = loader_config(args)
    # "raw": the shard format in the name, so that shards cached by an earlier format are not reopened
    out = f"{data.root}-latents-raw-{data.builtin_images_per_class}x{data.builtin_image_size}"
    latent = latent_config(f"module:{POOL_LATENTS}")
    preprocess(data, out, encoder_from_latent_space(latent, device), latent_space=f"module:{POOL_LATENTS}",
               batch_size=64, device=device, decode_threads=min(os.cpu_count() or 1, 8))
    return out


def trainer_config(args, parts, precision: str, use_compile: bool, output_dir: str, latents_root: str,
                   zero_stage: int | None = None, step_kernel: str = "torch"):
    """The ExperimentConfig of a trainer variant: the benchmark's model, encoder and data (with latent
    shards), configs/deepspeed/zero2.json on one rank (`zero_stage`: train.zero_stage over its stage 2),
    the global batch one micro-batch; nothing written during the steps (no checkpoints, samples or logs)
    and nothing resumed."""
    from engine.config import from_dict

    encoder, model_cfg, transport, _ = parts
    data = dataclasses.replace(loader_config(args), num_classes=None, latents_root=latents_root)
    return from_dict({
        "model": model_cfg, "data": data, "encoders": [encoder.cfg],
        "latent": {"kind": "module", "path": POOL_LATENTS, "scale": 1.0, "shift": 0.0},
        "transport": transport.cfg,
        "train": {"output_dir": output_dir, "max_steps": 10 ** 9, "global_batch_size": args.batch,
                  "deepspeed_config": "configs/deepspeed/zero2.json", "zero_stage": zero_stage,
                  "precision": precision, "compile": bool(use_compile),
                  "cuda_graphs": use_compile == GRAPHS,
                  "debug_fixed_batch": args.loader == "none", "seed": 0},
        "optim": {"fused_clip": args.trainer_fused_clip, "step_kernel": step_kernel},
        "checkpoint": {"every": 0, "resume": "none"},
        "logging": {"progress_bar": False, "tensorboard": False, "sample_every": 0},
        "sample": {"num_images": 0},
    })


@contextlib.contextmanager
def _trainer_process_state():
    """What a Trainer changes in this process, put back afterwards so the variants after it (and the
    caller: a test, another benchmark) see none of it: the environment (RANK, MASTER_PORT, ...), the
    process group it creates, the kernels backend, the TF32 flags and DeepSpeed's process-wide autocast
    flag (set by a bf16-mixed engine)."""
    import torch.distributed as dist

    import kernels

    environ, had_group = dict(os.environ), dist.is_initialized()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        with kernels.use_backend(kernels.get_backend()):
            yield
    finally:
        autocast = sys.modules.get("deepspeed.runtime.torch_autocast")
        if autocast is not None:
            autocast.TORCH_AUTOCAST_INITIALIZED, autocast.TORCH_AUTOCAST_DTYPE = False, None
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        if dist.is_initialized() and not had_group:  # through DeepSpeed, which drops its references to the group
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)


@contextlib.contextmanager
def trainer_variant(args, parts, precision, use_compile, latents_root, zero_stage=None, step_kernel="torch"):
    """A Trainer of `trainer_config` in a scratch run directory, torn down afterwards (`_trainer_process_state`);
    its steps are those of Trainer.fit, without its logging and checkpoints."""
    import gc

    with _trainer_process_state(), tempfile.TemporaryDirectory(prefix="alignflow-bench-trainer-") as run_dir:
        from engine.trainer import Trainer

        trainer = Trainer(trainer_config(args, parts, precision, use_compile, run_dir, latents_root, zero_stage,
                                         step_kernel))
        try:
            yield trainer
        finally:
            trainer.engine.destroy()
            del trainer
            gc.collect()


def run_trainer_variant(name, precision, use_compile, args, device, parts, latents_root):
    """`Trainer.train_step` timed as `run_variant` times the benchmark's step (the same phases)."""
    step_kernel, launched = _step_kernel(name, device), _adamw_launches()
    with trainer_variant(args, parts, precision, use_compile, latents_root, TRAINER_ZERO_STAGES.get(name),
                         step_kernel) as trainer:
        row, metrics = timed_steps(trainer.train_step, args, device)
        _check_kernel_ran(name, step_kernel, launched)
        host_syncs = _count_host_syncs(trainer.train_step) if device.type == "cuda" else None
        profiled = _device_profile(trainer.train_step, args)
        facts = {"precision": trainer.precision, "zero_stage": trainer.engine.zero_optimization_stage(),
                 "kernels_backend": __import__("kernels").get_backend(), "loader": trainer.loader.backend.name,
                 "latents": "shards"}
    if not math.isfinite(metrics["loss"]):
        raise RuntimeError(f"{name}: non-finite loss {metrics['loss']}")
    return {"variant": name, **row, "host_syncs_per_step": host_syncs, "final_loss": metrics["loss"], **facts,
            **profiled}


def one_step(model, forward, optimizer, encoder, transport, latents, model_cfg, autocast, backend, images, labels,
             mark=lambda: None) -> dict:
    """One training step; `mark()` is called after the encoder, the forward + loss, the backward and the
    optimizer (clip_grad_norm_ then AdamW, or an optimizer that `clips_gradients` itself: ClippedAdamW,
    bench.model's stand-in for DeepSpeed's). Returns the losses."""
    import kernels

    with kernels.use_backend(backend):
        with torch.no_grad(), autocast:
            tokens, cls = encoder(images)
        mark()
        with autocast:
            losses = transport.training_losses(forward, latents, labels, [tokens],
                                               cls_target=cls if model_cfg.reg else None)
        mark()
        losses["loss"].backward()
        mark()
        if not getattr(optimizer, "clips_gradients", False):
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark()
    return losses


def _count_host_syncs(step) -> int:
    """Synchronising CUDA calls (a .item(), a data-dependent shape, ...) in one step: each stalls the
    launch queue. torch's sync debug mode warns once per call."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _release(device) -> None:
    """Free one variant's model, optimizer state and compiled graphs before the next is measured."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _compare(rows) -> None:
    """Each measured variant's img/s over the reference eager variant's, measured in the same run."""
    reference = next((r for r in rows if r["variant"] == "reference-eager" and "img_per_s" in r), None)
    for r in rows:
        if reference and "img_per_s" in r:
            r["speedup_vs_reference"] = r["img_per_s"] / reference["img_per_s"]


def markdown(payload) -> str:
    env, rows = payload["environment"], payload["variants"]
    lines = [f"{payload['model']} batch {payload['batch']} at {payload['resolution']} px on {env['device']} "
             f"(torch {env['torch']}, Triton {env['triton']}, {env['date']}"
             f"{'; host ' + env['cpu'] + ', ' + str(env['cpu_cores']) + ' cores' if 'cpu' in env else ''}); bf16 matmul ceiling "
             f"{payload['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s measured in the same run; images from the "
             f"{payload.get('loader', 'none (one fixed batch)')} loader, times in ms.", "",
             "| variant | img/s | vs reference eager | step ms | data | encoder | fwd+loss | backward | optimizer | peak GiB | TFLOP/s | MFU | host syncs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['variant']} | skipped: {r['skipped']} |" + " |" * 11)
            continue
        b = r["breakdown_seconds"]
        peak = f"{r['peak_memory_bytes'] / 2 ** 30:.1f}" if r["peak_memory_bytes"] else "-"
        ratio = f"{r['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in r else "-"  # no reference row
        data = f"{1e3 * b['data']:.1f}" if "data" in b else "-"
        lines.append(f"| {r['variant']} | {r['img_per_s']:.1f} | {ratio} | "
                     f"{1e3 * r['seconds_per_step']:.1f} | {data} | {1e3 * b['encoder']:.1f} | {1e3 * b['forward']:.1f} | "
                     f"{1e3 * b['backward']:.1f} | {1e3 * b['optimizer']:.1f} | {peak} | {r['tflop_per_s']:.1f} | "
                     f"{100 * r['mfu']:.1f}% | {'-' if r.get('host_syncs_per_step') is None else r['host_syncs_per_step']} |")
    if any(r["variant"] in TRAINER_VARIANTS for r in rows):
        lines += ["", "trainer-* rows time `engine.trainer.Trainer.train_step` as the `deepspeed` launcher runs it on "
                      "one GPU (DeepSpeed ZeRO-2, or the stage a -zero<N> name gives as `train.zero_stage`; the named "
                      "`train.precision`, EMA update, the finite-loss check and "
                      "its host sync; latents read from shards by the trainer's loader); the others time the "
                      "benchmark's own step (fp32 weights under bf16 autocast, torch's fused AdamW)."]
    profiled = markdown_rows(rows)
    if profiled:
        lines += [""] + profiled
    if payload["data"]:
        lines += [""] + loader_table(payload["data"])
    return "\n".join(lines) + "\n"


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """The step's shape: the arguments this benchmark and the cost model (bench.model) share."""
    parser.add_argument("--model", default="SiT-XL/2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--encoder", default="dinov2-vit-b")
    parser.add_argument("--encoder-depth", type=int, default=8)
    parser.add_argument("--reg", action="store_true", help="add REG's class token")
    parser.add_argument("--car-flow", default="none", choices=["none", "source", "target", "joint"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--variants", help=f"comma-separated, of {ORDER} (default: all; --smoke: the eager "
                                           "pair and the trainer's eager pair)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--budget-s", type=float, help="start no variant after this many seconds")
    parser.add_argument("--skip-data", action="store_true", help="leave out the data-loader rows")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="leave out the profiled step per variant (bench/profile.py; GPU only)")
    parser.add_argument("--trainer-fused-clip", default="auto", choices=["auto", "true", "false"],
                        help="the trainer variants' optim.fused_clip (auto: on on a GPU)")
    parser.add_argument("--loader", default="auto", choices=["auto", "pil", "dali", "none"],
                        help="where the step's images come from: the trainer's loader with this decoder "
                             "(auto: DALI nvJPEG on a GPU where installed, else PIL), or none (one fixed batch)")
    args = parser.parse_args(argv)
    deadline = Deadline(args.budget_s)
    args.variants = args.variants or ("reference-eager,alignflow,trainer-bf16,trainer-bf16-mixed,"
                                      "trainer-bf16-mixed-zero0" if args.smoke
                                      else ",".join(ORDER))
    unknown = sorted(set(args.variants.split(",")) - set(ORDER))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; allowed: {ORDER}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.model, args.batch, args.resolution, args.steps, args.warmup = "SiT-S/2", 2, 32, 2, 1
        args.encoder_depth = 1
        args.loader = "pil" if args.loader == "auto" else args.loader
    elif device.type == "cpu":
        print("no GPU: a full training-step benchmark on the CPU means nothing; use --smoke", file=sys.stderr)
        return 2

    matmul = measure_matmul_flops(device)
    parts = build(args, device)
    from engine.models import build_model

    with torch.device("meta"):  # the count needs the shapes only
        model_flops = build_model(parts[1]).flops_per_sample()
    step_flops = training_step_flops(model_flops, args.batch, parts[3])
    loader = build_loader(args, device)
    rows = []
    payload = {"environment": environment(), "model": args.model, "batch": args.batch,
               "resolution": args.resolution, "encoder": args.encoder, "encoder_depth": args.encoder_depth,
               "reg": args.reg, "car_flow": args.car_flow,
               "step_flops": step_flops, "matmul_flop_per_s": matmul, "variants": rows, "data": [],
               "loader": "none (one fixed batch)" if loader is None else loader.backend.name}
    latents_root = None
    for epoch, name in enumerate(sorted(args.variants.split(","), key=ORDER.index)):
        trainer = name in TRAINER_VARIANTS
        backend, use_compile = TRAINER_VARIANTS[name] if trainer else VARIANTS[name]
        # the trainer builds its DeepSpeed engine, loader and encoder first (and, once, the latent shards)
        late = deadline.out_of_time(needed_s=0.0 if args.smoke else (120.0 if use_compile else 60.0 if trainer else 30.0))
        try:
            if late:
                row = {"variant": name, "skipped": late}
            elif trainer:
                latents_root = latents_root or latent_shards(args, device)
                row = run_trainer_variant(name, backend, use_compile, args, device, parts, latents_root)
            else:
                row = run_variant(name, backend, use_compile, args, device, parts, loader, epoch)
        except Exception as error:  # a variant that cannot run is reported with its reason
            row = {"variant": name, "skipped": f"{type(error).__name__}: {str(error)[:300]}"}
        if "seconds_per_step" in row:
            row["tflop_per_s"] = step_flops / row["seconds_per_step"] / 1e12
            row["mfu"] = step_flops / row["seconds_per_step"] / matmul
        rows.append(row)
        print(row, flush=True)
        _release(device)
        _compare(rows)
        if not args.smoke:
            write_json("train_step", payload, args.out)  # what is measured so far survives a cut
    if not args.skip_data:
        late = deadline.out_of_time(needed_s=0.0 if args.smoke else 30.0)
        payload["data"] = ([{"loader": "all", "skipped": late}] if late else
                           loader_rows(args.resolution, min(args.batch, 16) if args.smoke else args.batch,
                                       2 if args.smoke else 50, 8 if args.smoke else 400, device))
    if args.smoke:
        print(markdown(payload))
        return 1 if any("skipped" in r for r in rows) else 0
    write_results("train_step", payload, args.out, lambda: markdown(payload))  # the JSON first, whatever the table does
    return 0


if __name__ == "__main__":
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main())
