"""A user-side autoencoder for the "module" latent space tests: 2x2 average pooling to 4 channels
(RGB and their mean), nearest upsampling back; the posterior std is a fixed fraction of |mean|."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class PoolAutoencoder(nn.Module):
    channels = 4
    downsample = 2

    def __init__(self, deterministic: bool = False):
        super().__init__()
        self.deterministic = deterministic

    def encode(self, x):
        pooled = F.avg_pool2d(x, 2)
        mean = torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)
        return mean if self.deterministic else (mean, 0.1 * mean.abs())

    def decode(self, z):
        return F.interpolate(z[:, :3], scale_factor=2, mode="nearest")


def build(cfg):
    return PoolAutoencoder()


def build_deterministic(cfg):
    return PoolAutoencoder(deterministic=True)


def build_wrong_shape(cfg):
    model = PoolAutoencoder()
    model.channels = 3
    return model


def build_not_an_autoencoder(cfg):
    return nn.Linear(2, 2)


class NaNFirstAutoencoder(PoolAutoencoder):
    """Encodes the first image of every batch to NaN (a broken encoder)."""

    def encode(self, x):
        mean, std = super().encode(x)
        mean = mean.clone()
        mean[0] = float("nan")
        return mean, std


def build_nan_first(cfg):
    return NaNFirstAutoencoder()
