"""Tiny model configs and an independent, functional statement of REPA's SiT forward for the tests."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.models import ModelConfig, build_model


def tiny_config(**overrides) -> ModelConfig:
    values = dict(name="SiT-S/2", hidden_size=32, depth=2, num_heads=2, input_size=8, in_channels=4,
                  num_classes=10, encoder_depth=1, z_dims=[24], projector_dim=32)
    values.update(overrides)
    return ModelConfig(**values)


def tiny_model(**overrides):
    return build_model(tiny_config(**overrides))


def randomize(model, scale=0.2, generator=None):
    """Give every trainable parameter (the zero-initialised ones included) random values."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype) * scale)
    return model


def repa_state_dict_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Key -> shape of the public REPA (and REG) models/sit.py state_dict for this configuration."""
    D, p, C = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    T = (cfg.input_size // p) ** 2 + int(cfg.reg)
    hidden = int(D * cfg.mlp_ratio)
    shapes = {
        "pos_embed": (1, T, D),
        "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (cfg.num_classes + int(cfg.class_dropout_prob > 0), D),
        "final_layer.linear.weight": (p * p * C, D), "final_layer.linear.bias": (p * p * C,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "mlp.fc1.weight": (hidden, D), b + "mlp.fc1.bias": (hidden,),
            b + "mlp.fc2.weight": (D, hidden), b + "mlp.fc2.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,),
        })
        if cfg.qk_norm:
            d = D // cfg.num_heads
            for name in ("q_norm", "k_norm"):
                shapes.update({b + f"attn.{name}.weight": (d,), b + f"attn.{name}.bias": (d,)})
    P = cfg.projector_dim
    for j, z in enumerate(cfg.z_dims):
        pr = f"projectors.{j}."
        shapes.update({pr + "0.weight": (P, D), pr + "0.bias": (P,), pr + "2.weight": (P, P), pr + "2.bias": (P,),
                       pr + "4.weight": (z, P), pr + "4.bias": (z,)})
    if cfg.reg:
        z = cfg.z_dims[0]
        shapes.update({"final_layer.linear_cls.weight": (z, D), "final_layer.linear_cls.bias": (z,),
                       "cls_projectors2.weight": (D, z), "cls_projectors2.bias": (D,),
                       "wg_norm.weight": (D,), "wg_norm.bias": (D,)})
    return shapes


def repa_forward(sd: dict, cfg: ModelConfig, x, t, y, cls_token=None):
    """REPA's SiT forward (eval mode) written out with functional ops on a state dict."""
    D, p, C, H = cfg.hidden_size, cfg.patch_size, cfg.in_channels, cfg.num_heads
    d = D // H
    B = x.shape[0]

    def linear(v, name):
        return F.linear(v, sd[name + ".weight"], sd[name + ".bias"])

    def modulate(v, shift, scale):
        return F.layer_norm(v, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    if cfg.reg:
        cls = F.layer_norm(linear(cls_token, "cls_projectors2"), (D,), sd["wg_norm.weight"], sd["wg_norm.bias"], 1e-6)
        h = torch.cat([cls[:, None], h], dim=1)
    h = h + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    t_embed = linear(F.silu(linear(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = t_embed + sd["y_embedder.embedding_table.weight"][y]
    zs = []
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        s_msa, sc_msa, g_msa, s_mlp, sc_mlp, g_mlp = linear(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=-1)
        a = modulate(h, s_msa, sc_msa)
        q, k, v = linear(a, b + "attn.qkv").reshape(B, -1, 3, H, d).permute(2, 0, 3, 1, 4)
        if cfg.qk_norm:
            q = F.layer_norm(q, (d,), sd[b + "attn.q_norm.weight"], sd[b + "attn.q_norm.bias"], 1e-5)
            k = F.layer_norm(k, (d,), sd[b + "attn.k_norm.weight"], sd[b + "attn.k_norm.bias"], 1e-5)
        o = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1) @ v
        h = h + g_msa[:, None] * linear(o.transpose(1, 2).reshape(B, -1, D), b + "attn.proj")
        m = linear(F.gelu(linear(modulate(h, s_mlp, sc_mlp), b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        h = h + g_mlp[:, None] * m
        if i + 1 == cfg.encoder_depth:
            for j in range(len(cfg.z_dims)):
                pr = f"projectors.{j}."
                zs.append(linear(F.silu(linear(F.silu(linear(h, pr + "0")), pr + "2")), pr + "4"))
    shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=-1)
    f = modulate(h, shift, scale)
    out = linear(f[:, int(cfg.reg):], "final_layer.linear")
    g = cfg.input_size // p
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(B, g, g, p, p, C)).reshape(B, C, g * p, g * p)
    if cfg.reg:
        return out, zs, linear(f[:, 0], "final_layer.linear_cls")
    return out, zs
