"""Benchmark case for the frozen encoder (DINOv2-B at SiT-XL/2's 256 px: 224 px input, 256 patches + the
class token, head dim 64), forward under no_grad from uint8 images to (patch tokens, class token):

  reference eager     `fused: false`, REPA's path: fp32 weights cast to bf16 by autocast on every call,
                      timm's attention (PyTorch SDPA)
  reference compiled  the same under torch.compile
  fused eager         `fused: true` (the default): Linear/Conv weights cast to bf16 once, attention on
                      kernels.attention_qkv (the Triton kernel)
  fused compiled      the same, `Encoder.compile_features()` (as the trainer does under train.compile)

Random weights (pretrained: false): the timing does not depend on them. FLOPs: bench/flops.py's ViT
forward count (matmuls and attention), so TFLOP/s is model FLOPs per second.
"""
from __future__ import annotations

import dataclasses

import torch

import kernels
from bench.common import BenchCase, Variant
from bench.flops import vit_forward_flops


def _encoders(device, smoke):
    from engine.models.encoders import EncoderConfig, build_encoder

    if smoke:
        cfg = EncoderConfig(name="vit_tiny_patch16_224", pretrained=False, resolution=32, image_size=32,
                            model_kwargs=dict(depth=1))
    else:
        cfg = EncoderConfig(name="dinov2-vit-b", pretrained=False, resolution=256)
    torch.manual_seed(0)
    fused = build_encoder(cfg, device=device)
    reference = build_encoder(dataclasses.replace(cfg, fused=False), device=device)
    reference.model.load_state_dict(fused.model.state_dict())
    if smoke:  # the CUDA (bf16) path on the CPU, through the Triton interpreter
        fused.low_precision_devices = reference.low_precision_devices = ("cuda", "cpu")
    return cfg, reference, fused


def cases(device, smoke):
    try:
        cfg, reference, fused = _encoders(device, smoke)
    except ImportError as error:  # timm is the `train` extra
        return [BenchCase("encoder", "frozen encoder", forward=[Variant("fused eager", lambda: None,
                                                                        f"not importable: {error}")])]
    batch = 2 if smoke else 32
    images = torch.randint(0, 256, (batch, 3, cfg.resolution, cfg.resolution), dtype=torch.uint8, device=device)

    def run(encoder, compile_it):
        def make():
            encoder.compile_features(compile_it, dynamic=False)

            def call():
                with kernels.use_backend("triton" if encoder.cfg.fused else "torch"):
                    return encoder(images)
            return call
        return make

    skip = "smoke run: torch.compile skipped" if smoke else None
    variants = [Variant("reference eager", run(reference, False)), Variant("reference compiled", run(reference, True), skip),
                Variant("fused eager", run(fused, False)), Variant("fused compiled", run(fused, True), skip)]
    vit = fused.model
    tokens = fused.num_patches + fused.num_prefix_tokens
    flops = batch * vit_forward_flops(fused.embed_dim, len(vit.blocks), tokens, vit.patch_embed.patch_size[0])
    label = "smoke" if smoke else f"DINOv2-B (SiT-XL/2 256px) B={batch} N={tokens} d=64"
    return [BenchCase("encoder", label, forward=variants, flops_forward=flops,
                      notes="uint8 images to (patch tokens, class token), no_grad, bf16; flops: bench/flops.py's ViT "
                            "forward")]
