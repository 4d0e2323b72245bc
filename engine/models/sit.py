"""SiT (Scalable Interpolant Transformer) with REPA projectors, the REG class token and CAR-Flow shifts.

The module tree and parameter names follow the public REPA `models/sit.py` (and REG's additions), so
released checkpoints load with `strict=True`:

    x_embedder.proj            Conv2d patch embedding                  pos_embed (1, T[+1], D), frozen
    t_embedder.mlp.{0,2}       timestep MLP                            y_embedder.embedding_table
    blocks.i.attn.{qkv,proj}   [q_norm, k_norm]                        blocks.i.mlp.{fc1,fc2}
    blocks.i.adaLN_modulation.1                                        projectors.j.{0,2,4}
    final_layer.{linear, adaLN_modulation.1}   REG: final_layer.linear_cls, cls_projectors2, wg_norm

Time t is continuous in [0, 1] (t = 1 is noise in REPA's direction); the embedding sees t unscaled.

The blocks run on `kernels`: each residual add is fused with the LayerNorm + modulate that follows it
(including the next block's, and the final layer's), so one block costs two fused adaLN passes.
"""
from __future__ import annotations


import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels
from engine.bf16_copies import concatenated_copies, matmul_weights
from engine.configurable import FromDict, invalid

LN_EPS = 1e-6
QK_NORM_EPS = 1e-5  # nn.LayerNorm's default, which timm's Attention (used by REPA) builds for qk-norm
CAR_FLOW_MODES = ("none", "source", "target", "joint")
CAR_FLOW_SHAPES = ("full", "channel")
MLP_KERNELS = ("torch", "triton")

# name -> (depth, hidden_size, num_heads, patch_size)
PRESETS = {
    f"SiT-{size}/{patch}": (depth, hidden, heads, patch)
    for size, (depth, hidden, heads) in {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
                                         "XL": (28, 1152, 16)}.items()
    for patch in (1, 2, 4, 8)
}


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

@dataclass
class ModelConfig(FromDict):
    """A SiT preset by `name`, optionally with `hidden_size`/`depth`/`num_heads`/`patch_size` overridden
    (tiny test models), plus the REPA / REG / CAR-Flow options."""

    name: str = "SiT-XL/2"
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    encoder_depth: int | None = None  # block whose output REPA aligns; None: 8 for L/XL, 4 for S/B (REPA)
    z_dims: list[int] = field(default_factory=lambda: [768])
    projector_dim: int = 2048
    qk_norm: bool = False
    reg: bool = False
    car_flow: str = "none"
    car_flow_shape: str = "full"      # "full": a (C, H, W) shift per class; "channel": (C, 1, 1)
    car_flow_rank: int = 64           # width of each shift network's hidden layer
    mlp_ratio: float = 4.0
    # SiT's released checkpoints learn a variance too: the final layer gives 2 x in_channels, the first
    # half is the velocity (as SiT's forward returns it) and the second half is unused
    learn_sigma: bool = False
    grad_checkpointing: bool = False  # recompute each block in the backward (activation memory ~ depth x less)
    # the MLP's GELU backward also sums fc1's bias gradient (kernels.gelu_tanh), saving torch's separate
    # pass over dL/da; false: nn.Linear's bias sum. The same numbers either way (torch backend: bitwise)
    fused_gelu: bool = True
    # the MLP as one op (kernels.mlp_gelu): fc1's Triton matmul writes GELU(a) and a in its epilogue,
    # fc2's input-gradient Triton matmul applies GELU'(a) in its own and sums fc1's bias gradient; the
    # weight gradients stay cuBLAS. "torch": cuBLAS fc1 + kernels.gelu_tanh + cuBLAS fc2. Opt-in: not
    # measured on a GPU (it becomes the default only once a GPU shows it at least as fast as cuBLAS).
    # Under ZeRO-3 (parameters gathered one module at a time) the MLP runs the "torch" path
    mlp_kernel: str = "torch"
    # the 28 blocks' (and the final layer's) adaLN modulation Linears, which all read SiLU(c), as one
    # matmul over their weights concatenated at forward time (state_dict keys unchanged). "auto": where
    # the concatenation costs nothing, i.e. where autocast casts the fp32 weights anyway (the copy into
    # the concatenated buffer is that cast), with the fused kernels (not on the torch backend, so the
    # CPU default path keeps its numerics bitwise) and not under ZeRO-3 (its hooks gather one module at
    # a time); true: also otherwise (one extra copy of the weights); false: one matmul per block
    batched_modulation: bool | str = "auto"
    # attn.proj's and mlp.fc2's biases added inside the adaLN residual kernel that reads their output,
    # which then also sums their gradients (the per-row dL/dh it forms anyway), instead of nn.Linear's
    # backward summing dL/dh over all B * N rows in a pass of its own. "auto": on CUDA with the Triton
    # kernels (not on the CPU, whose default path stays bitwise, nor on the "cuda" backend, whose CUDA C++
    # kernel takes no bias); true: wherever the fused ops run (the torch backend adds the bias in fp32
    # in the reference); false: nn.Linear's own bias
    fused_bias_grad: bool | str = "auto"
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None

    def __post_init__(self):
        def bad(key, value, allowed):
            raise invalid(key, value, allowed)

        if self.name not in PRESETS:
            bad("name", self.name, "one of " + ", ".join(PRESETS))
        depth, hidden, heads, patch = PRESETS[self.name]
        self.depth = depth if self.depth is None else self.depth
        self.hidden_size = hidden if self.hidden_size is None else self.hidden_size
        self.num_heads = heads if self.num_heads is None else self.num_heads
        self.patch_size = patch if self.patch_size is None else self.patch_size
        if self.encoder_depth is None:
            self.encoder_depth = 8 if self.name.startswith(("SiT-L", "SiT-XL")) else 4
        self.z_dims = list(self.z_dims)
        for key in ("input_size", "in_channels", "num_classes", "depth", "hidden_size", "num_heads",
                    "patch_size", "projector_dim", "car_flow_rank"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(key, value, "a positive integer")
        if self.hidden_size % self.num_heads:
            bad("hidden_size", self.hidden_size, f"a multiple of num_heads={self.num_heads}")
        if self.hidden_size % 4:
            bad("hidden_size", self.hidden_size, "a multiple of 4 (2D sin-cos positional embedding)")
        if self.input_size % self.patch_size:
            bad("input_size", self.input_size, f"a multiple of patch_size={self.patch_size}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            bad("class_dropout_prob", self.class_dropout_prob, "a number in [0, 1)")
        if any(not isinstance(z, int) or isinstance(z, bool) or z < 1 for z in self.z_dims):
            bad("z_dims", self.z_dims, "a list of positive integers (empty: no REPA projector)")
        if not isinstance(self.encoder_depth, int) or self.z_dims and not 1 <= self.encoder_depth <= self.depth:
            bad("encoder_depth", self.encoder_depth, f"an integer in [1, depth={self.depth}]")
        if self.reg and not self.z_dims:
            bad("reg", self.reg, "False unless z_dims is non-empty (the class token width is z_dims[0])")
        if self.car_flow not in CAR_FLOW_MODES:
            bad("car_flow", self.car_flow, f"one of {', '.join(CAR_FLOW_MODES)}")
        if self.car_flow_shape not in CAR_FLOW_SHAPES:
            bad("car_flow_shape", self.car_flow_shape, f"one of {', '.join(CAR_FLOW_SHAPES)}")
        if not self.mlp_ratio > 0:
            bad("mlp_ratio", self.mlp_ratio, "a positive number")
        if not isinstance(self.learn_sigma, bool):
            bad("learn_sigma", self.learn_sigma, "true or false")
        if not isinstance(self.fused_gelu, bool):
            bad("fused_gelu", self.fused_gelu, "true or false")
        if self.mlp_kernel not in MLP_KERNELS:
            bad("mlp_kernel", self.mlp_kernel, f"one of {', '.join(MLP_KERNELS)}")
        if not (isinstance(self.batched_modulation, bool) or self.batched_modulation == "auto"):
            bad("batched_modulation", self.batched_modulation, "auto, true or false")
        if not (isinstance(self.fused_bias_grad, bool) or self.fused_bias_grad == "auto"):
            bad("fused_bias_grad", self.fused_bias_grad, "auto, true or false")


    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2


# ----------------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, T, D) with a stride-p convolution."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D)


def timestep_frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t f_i), sin(t f_i)] with f_i = max_period^(-i / half), i < half; zero-padded to odd dim."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(timestep_frequencies(t, self.frequency_embedding_size).to(t.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding; with dropout > 0 the table has one more row, the null class `num_classes`."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def drop(self, labels):
        """Replace each label by the null class with probability dropout_prob."""
        if self.dropout_prob <= 0:
            return labels
        dropped = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        return torch.where(dropped, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels):
        return self.embedding_table(labels)


# ----------------------------------------------------------------------------------------------
# Block and final layer
# ----------------------------------------------------------------------------------------------

class LinearBiasHandedOn(nn.Linear):
    """nn.Linear (REPA's proj/fc2 keys) whose output feeds kernels.adaln_residual_modulate. The forward
    returns (x @ W^T, bias) when model.fused_bias_grad is on for x, so that the kernel adds the bias and
    sums its gradient in its own backward pass; otherwise (x @ W^T + b, None). The weight is used inside
    this forward (DeepSpeed ZeRO-3 gathers a module's parameters around its forward); a ZeRO-3 bias is
    handed on as a copy, which outlives the release of the gathered parameter after the forward."""

    reads_matmul_weights = True  # engine.bf16_copies: its forward reads the bf16 weight copies itself

    def __init__(self, in_features, out_features, fused_bias_grad: bool | str = "auto"):
        super().__init__(in_features, out_features)
        self.fused_bias_grad = fused_bias_grad

    def hands_on_bias(self, x) -> bool:
        if self.fused_bias_grad == "auto":
            return x.device.type == "cuda" and kernels.get_backend() == "triton"
        return self.fused_bias_grad

    def forward(self, x):
        weight, bias = matmul_weights(self)  # the parameters, or their bf16 copies (train.bf16_weight_copies)
        if not self.hands_on_bias(x):
            return F.linear(x, weight, bias), None
        # the parameter itself, not a bf16 copy: the kernel adds it and sums its gradient in fp32
        return F.linear(x, weight), self.bias.clone() if hasattr(self.bias, "ds_id") else self.bias


def add_bias(h, bias):
    """h + bias where a LinearBiasHandedOn handed its bias on (for a residual outside the fused kernel)."""
    return h if bias is None else h + bias


class Attention(nn.Module):
    """Returns (proj output, proj bias or None): see LinearBiasHandedOn."""

    def __init__(self, dim, num_heads, qk_norm=False, fused_bias_grad: bool | str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qk_norm = qk_norm
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        if qk_norm:
            self.q_norm = nn.LayerNorm(self.head_dim, eps=QK_NORM_EPS)
            self.k_norm = nn.LayerNorm(self.head_dim, eps=QK_NORM_EPS)
        self.proj = LinearBiasHandedOn(dim, dim, fused_bias_grad)

    def forward(self, x):
        qkv = self.qkv(x)                                   # (B, N, 3D)
        norms = {}
        if self.qk_norm:  # fused into the attention kernel's q/k loads
            norms = dict(q_norm_weight=self.q_norm.weight, q_norm_bias=self.q_norm.bias,
                         k_norm_weight=self.k_norm.weight, k_norm_bias=self.k_norm.bias,
                         qk_norm_eps=self.q_norm.eps)
        o = kernels.attention_qkv(qkv, self.num_heads, **norms)  # (B, N, D)
        return self.proj(o)


class LinearGELU(nn.Linear):
    """nn.Linear followed by GELU(tanh), as one module so that its weight and bias are used inside its
    own forward (DeepSpeed ZeRO-3 gathers a module's parameters around its forward). With `fused`, the
    GELU backward's kernel also gives the bias its gradient (kernels.gelu_tanh), instead of nn.Linear's
    backward summing dL/da in a pass of its own. The parameters are nn.Linear's (REPA's fc1 keys)."""

    reads_matmul_weights = True  # engine.bf16_copies: its forward reads the bf16 weight copies itself

    def __init__(self, in_features, out_features, fused=True):
        super().__init__(in_features, out_features)
        self.fused = fused

    def forward(self, x):
        weight, bias = matmul_weights(self)  # the parameters, or their bf16 copies (train.bf16_weight_copies)
        if self.fused:
            return kernels.gelu_tanh(F.linear(x, weight, bias.detach()), self.bias)
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")


class Mlp(nn.Module):
    """fc2(GELU_tanh(fc1(x))); fc1 holds the GELU (LinearGELU). Returns (fc2 output, fc2 bias or None):
    see LinearBiasHandedOn. With kernel "triton" (model.mlp_kernel) the whole MLP is one op,
    kernels.mlp_gelu, reading fc1's and fc2's parameters (or their bf16 copies) here."""

    def __init__(self, dim, hidden, fused_gelu=True, fused_bias_grad: bool | str = "auto", kernel: str = "torch"):
        super().__init__()
        self.fc1 = LinearGELU(dim, hidden, fused=fused_gelu)
        self.fc2 = LinearBiasHandedOn(hidden, dim, fused_bias_grad)
        self.kernel = kernel

    def forward(self, x):
        # ZeRO-3 gathers each Linear's parameters around its own forward only: those run per layer
        if self.kernel == "triton" and not any(hasattr(p, "ds_id") for p in self.parameters()):
            return self.fused_forward(x)
        return self.fc2(self.fc1(x))

    def fused_forward(self, x):
        (w1, b1), (w2, b2) = matmul_weights(self.fc1), matmul_weights(self.fc2)
        device = x.device.type
        if torch.is_autocast_enabled(device):  # autocast does not reach a custom op: cast as F.linear would
            dtype = torch.get_autocast_dtype(device)
            x, w1, w2, b2 = (t.to(dtype) for t in (x, w1, w2, b2))
            b1 = self.fc1.bias  # the fp32 parameter: the op rounds it as the cast would, its gradient stays fp32
        if self.fc2.hands_on_bias(x):
            return kernels.mlp_gelu(x, w1, b1, w2), self.fc2.bias
        return kernels.mlp_gelu(x, w1, b1, w2, b2), None


class SiTBlock(nn.Module):
    """adaLN-Zero block. Its LayerNorms have no parameters; they run inside kernels.adaln_*."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False, fused_gelu=True,
                 fused_bias_grad: bool | str = "auto", mlp_kernel: str = "torch"):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads, qk_norm, fused_bias_grad)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), fused_gelu, fused_bias_grad, mlp_kernel)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def modulation(self, c):
        """shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each (B, D)."""
        return self.adaLN_modulation(c).chunk(6, dim=-1)

    def step(self, residual, h, gate_msa, shift_mlp, scale_mlp, gate_mlp, next_shift, next_scale):
        """The block inside the model's fused chain. h = modulate(LN(residual)) for this block's attention
        comes in; (residual after the block, modulate(LN(residual)) for the next block or the final layer
        with next_shift / next_scale) goes out. Each residual add is fused with the LayerNorm after it (and
        with attn.proj's and mlp.fc2's bias where they hand it on)."""
        out, bias = self.attn(h)
        residual, h = kernels.adaln_residual_modulate(residual, out, gate_msa, shift_mlp, scale_mlp, LN_EPS,
                                                      bias=bias)
        out, bias = self.mlp(h)
        return kernels.adaln_residual_modulate(residual, out, gate_mlp, next_shift, next_scale, LN_EPS, bias=bias)

    def forward(self, x, c):
        """One block on its own: x + gate * attn(modulate(LN x)), then the same with the MLP."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        h = kernels.adaln_modulate(x, shift_msa, scale_msa, LN_EPS)
        out, bias = self.attn(h)
        x, h = kernels.adaln_residual_modulate(x, out, gate_msa, shift_mlp, scale_mlp, LN_EPS, bias=bias)
        return x + gate_mlp.unsqueeze(1) * add_bias(*self.mlp(h))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels, cls_dim=None):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        if cls_dim is not None:
            self.linear_cls = nn.Linear(hidden_size, cls_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def modulation(self, c):
        return self.adaLN_modulation(c).chunk(2, dim=-1)  # shift, scale


class _CastConcat(torch.autograd.Function):
    """`tensors` (each (rows_i, ...)) copied into one (sum rows_i, ...) tensor of `dtype`, one copy per
    tensor: where autocast would cast each weight for its own matmul, the copy is that cast. With
    `copied`, that tensor already holds the copies (engine.bf16_copies) and is returned as is. The
    backward hands each tensor its rows of the gradient, cast back to its dtype (as autocast's cast does)."""

    @staticmethod
    def forward(ctx, dtype, copied, *tensors):
        ctx.rows, ctx.dtypes = [t.shape[0] for t in tensors], [t.dtype for t in tensors]
        if copied is not None:
            return copied
        out = tensors[0].new_empty((sum(ctx.rows), *tensors[0].shape[1:]), dtype=dtype)
        for part, t in zip(out.split(ctx.rows), tensors):
            part.copy_(t)
        return out

    @staticmethod
    def backward(ctx, grad):
        return (None, None, *(g.to(dtype) for g, dtype in zip(grad.split(ctx.rows), ctx.dtypes)))


def build_mlp(hidden_size, projector_dim, z_dim):
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, z_dim))


class ShiftNet(nn.Module):
    """CAR-Flow shift mu(y) from the class embedding: SiLU -> Linear(D, r) -> SiLU -> Linear(r, size).
    The last layer starts at zero, so training starts from the unshifted flow."""

    def __init__(self, hidden_size, rank, shape):
        super().__init__()
        self.shape = tuple(shape)
        self.net = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, rank), nn.SiLU(),
                                 nn.Linear(rank, math.prod(shape)))

    def forward(self, class_embedding):
        return self.net(class_embedding).view(-1, *self.shape)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

class SiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)  # final layer's channels
        self.patch_size = cfg.patch_size
        self.num_heads = cfg.num_heads
        self.num_classes = cfg.num_classes
        self.z_dims = list(cfg.z_dims)
        self.encoder_depth = cfg.encoder_depth
        self.reg = cfg.reg
        self.cls_dim = cfg.z_dims[0] if cfg.reg else None

        self.x_embedder = PatchEmbed(cfg.input_size, cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        num_tokens = self.x_embedder.num_patches + int(cfg.reg)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, D), requires_grad=False)
        self.blocks = nn.ModuleList([SiTBlock(D, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm, cfg.fused_gelu,
                                              cfg.fused_bias_grad, cfg.mlp_kernel) for _ in range(cfg.depth)])
        self.projectors = nn.ModuleList([build_mlp(D, cfg.projector_dim, z) for z in cfg.z_dims])
        self.final_layer = FinalLayer(D, cfg.patch_size, self.out_channels, self.cls_dim)
        if cfg.reg:
            self.cls_projectors2 = nn.Linear(self.cls_dim, D)
            self.wg_norm = nn.LayerNorm(D, eps=LN_EPS)
        shift_shape = ((cfg.in_channels, cfg.input_size, cfg.input_size) if cfg.car_flow_shape == "full"
                       else (cfg.in_channels, 1, 1))
        if cfg.car_flow in ("source", "joint"):
            self.car_source_shift = ShiftNet(D, cfg.car_flow_rank, shift_shape)
        if cfg.car_flow in ("target", "joint"):
            self.car_target_shift = ShiftNet(D, cfg.car_flow_rank, shift_shape)
        self.initialize_weights()

    def initialize_weights(self):
        def basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.apply(basic_init)

        grid = self.cfg.input_size // self.cfg.patch_size
        pos = sincos_pos_embed_2d(self.pos_embed.shape[-1], grid, extra_tokens=int(self.reg))
        self.pos_embed.data.copy_(pos.to(device=self.pos_embed.device, dtype=self.pos_embed.dtype)[None])

        # The patch embedding is initialised like the Linear it is.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity and the output as zero.
        zero = [block.adaLN_modulation[-1] for block in self.blocks]
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        if self.reg:
            zero.append(self.final_layer.linear_cls)
        zero += [net.net[-1] for net in self.shift_nets()]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def shift_nets(self):
        return [getattr(self, name) for name in ("car_source_shift", "car_target_shift") if hasattr(self, name)]

    # -- labels and CAR-Flow ------------------------------------------------------------------

    @property
    def null_class(self) -> int | None:
        """Label of the unconditional class (None when trained without label dropout)."""
        return self.num_classes if self.y_embedder.dropout_prob > 0 else None

    def drop_labels(self, y: torch.Tensor) -> torch.Tensor:
        """y with labels replaced by the null class at the class dropout rate (for training)."""
        return self.y_embedder.drop(y)

    def car_flow_shifts(self, y: torch.Tensor):
        """(mu0, mu1): CAR-Flow source and target shifts for labels y (as given, no dropout), each
        (B, C, H, W) or (B, C, 1, 1), or None where the model has no such shift."""
        nets = (getattr(self, "car_source_shift", None), getattr(self, "car_target_shift", None))
        if nets == (None, None):
            return None, None
        embedding = self.y_embedder(y)
        return tuple(None if net is None else net(embedding) for net in nets)

    # -- forward ------------------------------------------------------------------------------

    def unpatchify(self, x):
        """(B, T, p * p * C) -> (B, C, H, W)."""
        B, T, _ = x.shape
        p, c = self.patch_size, self.out_channels
        h = w = int(round(T ** 0.5))
        if h * w != T:
            raise ValueError(f"unpatchify needs a square token grid, got {T} tokens")
        x = x.reshape(B, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return x.reshape(B, c, h * p, w * p)

    def forward(self, x, t, y, cls_token=None):
        """x: (B, C, H, W) at time t: (B,) in [0, 1]; y: (B,) labels (num_classes = null class).

        Returns (velocity (B, C, H, W), zs), plus the class-token velocity (B, z_dims[0]) for a REG
        model, which also needs `cls_token` (the noised encoder class token, (B, z_dims[0])).
        zs: one (B, T[+1], z_dim) projection per encoder of the tokens after block `encoder_depth`.
        The labels are used as given: dropping them for classifier-free guidance is the training
        objective's step (engine.transport.Transport calls `drop_labels`, and gives the CAR-Flow shifts
        the same dropped labels).
        """
        if self.reg and cls_token is None:
            raise ValueError("a REG model needs cls_token, the noised class token of shape (B, "
                             f"{self.cls_dim})")
        if not self.reg and cls_token is not None:
            raise ValueError("cls_token given to a model built without reg=True")

        h = self.x_embedder(x)                                                   # (B, T, D)
        if self.reg:
            cls = self.wg_norm(self.cls_projectors2(cls_token.to(h.dtype)))      # (B, D)
            h = torch.cat([cls.unsqueeze(1).to(h.dtype), h], dim=1)              # (B, 1 + T, D)
        # The residual stream takes the weights' dtype: fp32 under autocast, as in REPA's code, where the
        # fp32 pos_embed promotes it (the adaLN kernels keep it fp32 and write bf16 branches); bf16 when
        # the weights are bf16 (DeepSpeed's bf16 mode).
        h = h + self.pos_embed                                                   # (B, T[+1], D)
        c = self.t_embedder(t) + self.y_embedder(y)                               # (B, D)

        modulations = self.modulations(c)
        zs = []
        residual = h
        h = kernels.adaln_modulate(residual, *modulations[0][:2], LN_EPS)
        for i, block in enumerate(self.blocks):
            args = (residual, h, *modulations[i][2:], *modulations[i + 1][:2])
            if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
                residual, h = checkpoint(block.step, *args, use_reentrant=False)
            else:
                residual, h = block.step(*args)
            if i + 1 == self.encoder_depth:
                zs = [projector(residual) for projector in self.projectors]     # (B, T, z_dim)

        # h = modulate(LN(residual)) with the final layer's shift and scale.
        velocity = self.unpatchify(self.final_layer.linear(h[:, int(self.reg):]))  # (B, C[*2], H, W)
        if self.cfg.learn_sigma:
            velocity = velocity[:, :self.in_channels]  # SiT: the first half; the variance half is unused
        if self.reg:
            return velocity, zs, self.final_layer.linear_cls(h[:, 0])
        return velocity, zs

    def modulations(self, c):
        """Per block (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), then the final layer's
        (shift, scale), each (B, D): every adaLN_modulation Linear applied to SiLU(c), one matmul per module,
        or all in one (model.batched_modulation)."""
        layers = self.modulation_layers()
        dtype = self._batched_modulation_dtype(c, layers)
        if dtype is None:
            return [block.modulation(c) for block in self.blocks] + [self.final_layer.modulation(c)]
        weight_copy, bias_copy = concatenated_copies(self, layers[0].weight) or (None, None)
        if weight_copy is not None and weight_copy.requires_grad:  # the copies are the gradients' leaves
            weight, bias = weight_copy, bias_copy
        else:
            weight = _CastConcat.apply(dtype, weight_copy, *(layer.weight for layer in layers))  # (sum 6D [+ 2D], D)
            bias = _CastConcat.apply(dtype, bias_copy, *(layer.bias for layer in layers))
        chunks = F.linear(F.silu(c), weight, bias).split(c.shape[-1], dim=-1)        # each (B, D)
        depth = len(self.blocks)
        return [chunks[6 * i:6 * i + 6] for i in range(depth)] + [chunks[6 * depth:]]

    def modulation_layers(self):
        """The adaLN modulation Linears of the blocks and the final layer, in the batched matmul's order."""
        return [block.adaLN_modulation[-1] for block in self.blocks] + [self.final_layer.adaLN_modulation[-1]]

    def _batched_modulation_dtype(self, c, layers):
        """The dtype of the concatenated modulation weights, or None for one matmul per module."""
        mode = self.cfg.batched_modulation
        if mode is False or any(hasattr(p, "ds_id") for layer in layers for p in layer.parameters()):
            return None  # off, or ZeRO-3-partitioned parameters (gathered per module around its forward)
        weight_dtype = layers[0].weight.dtype
        device = c.device.type
        casts = (torch.is_autocast_enabled(device) and weight_dtype == torch.float32
                 and torch.get_autocast_dtype(device) != torch.float32)
        if mode == "auto" and not (casts and kernels.get_backend() != "torch"):
            return None
        return torch.get_autocast_dtype(device) if casts else weight_dtype

    def num_parameters(self, exclude_projectors=False) -> int:
        skip = {id(p) for p in self.projectors.parameters()} if exclude_projectors else set()
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def flops_per_sample(self) -> float:
        """Forward FLOPs of one sample (matmuls only; backward is about twice this)."""
        cfg = self.cfg
        T, D = self.pos_embed.shape[1], cfg.hidden_size
        hidden = int(D * cfg.mlp_ratio)
        block = 2 * T * D * 3 * D + 2 * 2 * T * T * D + 2 * T * D * D + 2 * 2 * T * D * hidden
        projector = sum(2 * T * (D * cfg.projector_dim + cfg.projector_dim ** 2 + cfg.projector_dim * z)
                        for z in cfg.z_dims)
        patch = 2 * T * D * cfg.in_channels * cfg.patch_size ** 2 * 2
        return float(cfg.depth * block + projector + patch)


# ----------------------------------------------------------------------------------------------
# Positional embedding
# ----------------------------------------------------------------------------------------------

def sincos_embed_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): [sin(p w_i), cos(p w_i)], w_i = 10000^(-i / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int, extra_tokens: int = 0) -> torch.Tensor:
    """(extra + grid^2, dim) fixed embedding of a row-major grid: the first half of the channels encodes
    the column, the second half the row (the MAE/DiT layout); extra tokens get zero rows in front."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    emb = torch.cat([sincos_embed_1d(dim // 2, cols.reshape(-1)), sincos_embed_1d(dim // 2, rows.reshape(-1))],
                    dim=1)
    return torch.cat([torch.zeros(extra_tokens, dim, dtype=emb.dtype), emb], dim=0).float()


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------

def build_model(cfg: ModelConfig) -> SiT:
    return SiT(cfg)


def load_weights(model: SiT, path: str, key: str | None = None, strict: bool = True):
    """Load SiT weights from a REPA/REG checkpoint (.pt/.pth: a state dict or a dict holding one under
    `key`, by default "ema" then "model"; a "module." prefix is removed) or a .safetensors file."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        import argparse

        # weights_only: tensors and containers only (REPA's checkpoints add their argparse Namespace)
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    if key is not None:
        if key not in state:
            raise KeyError(f"checkpoint {path!r} has no {key!r} entry; it has {sorted(state)[:10]}")
        state = state[key]
    else:
        for candidate in ("ema", "model", "state_dict", "module"):
            if isinstance(state.get(candidate), dict):
                state = state[candidate]
                break
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return model.load_state_dict(state, strict=strict)


def _factory(name):
    def make(**overrides) -> SiT:
        return SiT(ModelConfig(name=name, **overrides))
    make.__name__ = name.replace("-", "_").replace("/", "_")
    return make


SiT_models = {name: _factory(name) for name in PRESETS}
