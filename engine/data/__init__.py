"""Data: DALI / PIL image pipelines, pre-extracted latent shards, the built-in synthetic set."""
from .builtin import make_builtin_dataset
from .config import DataConfig
from .index import CorruptImageError, SampleIndex
from .latent_shards import LatentShards, LatentShardWriter, read_meta
from .loader import Loader, build_index, build_loader

__all__ = ["DataConfig", "build_loader", "build_index", "Loader", "SampleIndex", "CorruptImageError",
           "make_builtin_dataset", "LatentShards", "LatentShardWriter", "read_meta"]
