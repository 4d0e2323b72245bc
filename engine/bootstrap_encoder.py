"""A representation encoder for runs without pretrained weights on disk.

Aligning to random features teaches nothing, so when `train.bootstrap_encoder` is set and an encoder's
weights are not found locally, rank 0 first trains that (small) timm ViT on the training data for a
few hundred steps with a class-prediction objective on both its class token and its mean patch token
(so the patch tokens REPA aligns to carry class information), saves it under
`<output_dir>/encoder/`, and every rank then loads it as a pretrained encoder. A resumed run reuses
the saved file.
"""
from __future__ import annotations

import dataclasses
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from engine.atomic_files import write_atomic


def bootstrap_path(output_dir: str, index: int, name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return os.path.join(output_dir, "encoder", f"encoder{index}_{safe}_bootstrap.pt")


def weights_available(enc_cfg) -> bool:
    """True when `build_encoder` would find pretrained weights on this machine."""
    from engine.models.encoders import build_encoder

    if not enc_cfg.pretrained:
        return False
    if enc_cfg.weights_path is not None:
        return os.path.exists(enc_cfg.weights_path)
    try:
        build_encoder(enc_cfg)
    except FileNotFoundError:
        return False
    return True


def train_encoder(enc_cfg, loader, num_classes: int, steps: int, device, seed: int, log=print) -> tuple[dict, float]:
    """Train the timm model of `enc_cfg` from scratch on `loader`'s batches; returns its state_dict and
    the class accuracy over the last 20 steps."""
    from engine.models.encoders import build_encoder

    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    encoder = build_encoder(dataclasses.replace(enc_cfg, pretrained=False), device=device)
    vit = encoder.model
    vit.train().requires_grad_(True)
    head = nn.Linear(encoder.embed_dim, num_classes).to(device)
    params = list(vit.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=max(steps, 1), pct_start=0.1)
    correct, seen, step, started = 0, 0, 0, time.time()
    while step < steps:
        for batch in loader:
            images, labels = batch["image"].to(device), batch["label"].to(device)
            tokens = vit.forward_features(encoder.preprocess(images))          # (B, prefix + N, D)
            cls, patches = tokens[:, 0], tokens[:, encoder.num_prefix_tokens:].mean(1)
            logits_cls, logits_patch = head(cls), head(patches)
            loss = F.cross_entropy(logits_cls, labels) + F.cross_entropy(logits_patch, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            if step > steps - 20:
                correct += int((logits_patch.argmax(1) == labels).sum())
                seen += len(labels)
            if step % 50 == 0 or step == steps:
                log(f"encoder bootstrap step {step}/{steps}: loss {loss.item():.3f} ({time.time() - started:.0f} s)")
            if step >= steps:
                break
    torch.set_rng_state(generator_state)
    return {k: v.detach().cpu() for k, v in vit.state_dict().items()}, correct / max(seen, 1)


def ensure_encoder_weights(cfg, index: int, rank: int, device, train_loader, monitor):
    """The EncoderConfig to build for `cfg.encoders[index]`: itself when its weights are on disk, else
    one pointing at a bootstrapped encoder (trained by rank 0 now, unless a previous run saved it)."""
    from engine.data import Loader

    enc_cfg = cfg.encoders[index]
    if weights_available(enc_cfg):
        return enc_cfg
    path = bootstrap_path(cfg.train.output_dir, index, enc_cfg.name)
    if rank == 0 and not os.path.exists(path):
        monitor.info(f"no pretrained weights for encoder {enc_cfg.name!r} found locally: training it on the "
                     f"training data for {cfg.train.bootstrap_encoder_steps} steps (alignment to random "
                     "features would teach nothing)")
        # A loader of its own over the same files, so the training loader's position is untouched.
        data_cfg = dataclasses.replace(cfg.data, seed=cfg.data.seed + 7919)
        loader = Loader(data_cfg, train_loader.index, 0, 1, train_loader.device, train_loader.backend)
        state, accuracy = train_encoder(enc_cfg, loader, cfg.model.num_classes, cfg.train.bootstrap_encoder_steps,
                                        device, cfg.train.seed, monitor.info)
        write_atomic(path, lambda f: torch.save({"model": state, "accuracy": accuracy}, f))
        monitor.info(f"bootstrapped encoder {enc_cfg.name!r}: class accuracy {accuracy:.1%} on its last "
                     f"training batches; saved {path}")
    if dist.is_initialized():
        dist.barrier()
    return dataclasses.replace(enc_cfg, pretrained=True, weights_path=path)
