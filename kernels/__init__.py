"""AlignFlow fused kernels. Each op: `reference_<op>` (the specification), Triton forward and
backward, and a public function that dispatches on the active backend (`set_backend`)."""
from ._backend import BACKENDS, get_backend, interpreting, set_backend, use_backend
from .adamw import adamw_step, reference_adamw_step
from .adaln import (adaln_modulate, adaln_residual_modulate, reference_adaln_modulate,
                    reference_adaln_residual_modulate)
from .alignment_loss import alignment_loss, reference_alignment_loss
from .gelu import gelu_tanh, reference_gelu_tanh
from .linear_gelu import mlp_gelu, reference_mlp_gelu
from .attention import attention, attention_qkv, reference_attention, reference_attention_qkv
from .interpolant import (PATHS, interpolant, path_coefficients, reference_interpolant, reference_velocity_loss,
                          velocity_loss)

__all__ = [
    "BACKENDS", "get_backend", "set_backend", "use_backend", "interpreting",
    "PATHS", "interpolant", "reference_interpolant", "velocity_loss", "reference_velocity_loss", "path_coefficients",
    "alignment_loss", "reference_alignment_loss",
    "adaln_modulate", "reference_adaln_modulate", "adaln_residual_modulate", "reference_adaln_residual_modulate",
    "attention", "reference_attention", "attention_qkv", "reference_attention_qkv",
    "gelu_tanh", "reference_gelu_tanh",
    "mlp_gelu", "reference_mlp_gelu",
    "adamw_step", "reference_adamw_step",
]
