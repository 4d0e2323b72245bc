"""SiT models (REPA / REG / CAR-Flow), frozen encoders and latent spaces.

Encoders (timm) and VAEs (diffusers) are imported lazily from their modules:
`engine.models.encoders.build_encoder`, `engine.models.latents.build_latent_space`.
"""
from .sit import PRESETS, ModelConfig, SiT, SiT_models, build_model, load_weights

__all__ = ["ModelConfig", "SiT", "SiT_models", "PRESETS", "build_model", "load_weights"]
