"""SiT models (REPA / REG / CAR-Flow), frozen encoders and latent spaces."""
from .sit import PRESETS, SiT, SiT_models, ModelConfig, build_model

__all__ = ["ModelConfig", "SiT", "SiT_models", "PRESETS", "build_model"]
