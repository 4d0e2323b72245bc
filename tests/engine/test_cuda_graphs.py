"""What a CUDA graph of the training step needs, checked on the CPU: the regions `train.cuda_graphs`
captures (the fused encoder's forward, the model's forward with the losses, its backward) make no host
synchronisation (a synchronising op, recorded by a dispatch mode, would stall a capture or be frozen
into it); the switch's config errors. The capture itself needs a GPU (bench.train_step's
`alignflow-graphs` and `trainer-bf16-graphs` variants; not measured yet)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from engine.transport import Transport, TransportConfig
from tests.engine.common import randomize, tiny_model

# aten ops that read a tensor's value on the host (item(), bool(), a data-dependent output shape)
SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "nonzero_static", "masked_select", "unique",
            "_unique", "_unique2", "unique_consecutive", "unique_dim", "equal", "allclose", "repeat_interleave",
            "bincount", "histc", "tolist"}


class HostSyncs(TorchDispatchMode):
    """Records every op that would synchronise the host with a GPU: the SYNC_OPS, and copies to
    another device (a device-to-host copy on a GPU)."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
        out = func(*args, **kwargs)
        if name in SYNC_OPS:
            self.syncs.append(name)
        elif name in ("_to_copy", "copy_") and isinstance(out, torch.Tensor):
            source = args[1] if name == "copy_" else args[0]
            if isinstance(source, torch.Tensor) and source.device != out.device:
                self.syncs.append(f"{name} {source.device} -> {out.device}")
        return out


def _step_regions(backend):
    """The syncs of each captured region of one training step of a tiny REPA + REG model."""
    model = randomize(tiny_model(z_dims=[24], reg=True)).train()
    transport = Transport(TransportConfig(time_sampling="lognormal"))
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    z, cls = torch.randn(2, 16, 24), torch.randn(2, 24)
    regions = {}
    with kernels.use_backend(backend):
        with HostSyncs() as forward:
            losses = transport.training_losses(model, x, y, [z], cls_target=cls)
        with HostSyncs() as backward:
            losses["loss"].backward()
    regions["forward + losses"], regions["backward"] = forward.syncs, backward.syncs
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    return regions


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_forward_losses_and_backward_make_no_host_sync(backend):
    regions = _step_regions(backend)
    assert regions == {"forward + losses": [], "backward": []}


def test_the_fused_encoder_forward_makes_no_host_sync():
    from engine.models.encoders import EncoderConfig, build_encoder

    encoder = build_encoder(EncoderConfig(name="vit_tiny_patch16_224", pretrained=False, resolution=32, image_size=32,
                                          model_kwargs=dict(depth=1)))
    encoder.low_precision_devices = ("cuda", "cpu")  # its CUDA path: the one-time cast, then bf16
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    encoder(images)  # the one-time cast happens before any capture (the first call, eager)
    with kernels.use_backend("triton"), HostSyncs() as syncs:
        encoder(images)
    assert syncs.syncs == []


def test_the_recorder_sees_a_host_sync():
    """The check can fail: an .item(), a bool() and a data-dependent shape are each recorded."""
    x = torch.randn(8)
    with HostSyncs() as syncs:
        x.sum().item()
        bool(x.max() > 0)
        x.nonzero()
    assert syncs.syncs == ["_local_scalar_dense", "_local_scalar_dense", "nonzero"]


def _config(tmp_path, **train):
    from engine.config import from_dict
    from tests.engine.trainer_fixtures import tiny_config

    base = dict(compile=True, cuda_graphs=True, global_batch_size=4, precision="bf16")
    return from_dict(tiny_config(tmp_path / "run", tmp_path / "data", train={**base, **train}))


def test_cuda_graphs_validates_on_a_gpu_and_refuses_what_it_cannot_capture(tmp_path):
    from engine.config import ConfigError, validate

    validate(_config(tmp_path), world_size=1, cuda_available=True, disk=False)
    validate(_config(tmp_path, zero_stage=1), world_size=1, cuda_available=True, disk=False)
    for train, available, fragment in [
            (dict(compile=False), True, "unless train.compile is true"),
            (dict(), False, "on the CPU"),
            (dict(global_batch_size=8), True, "gradient accumulation \\(2 micro-batches"),
            (dict(zero_stage=3), True, "ZeRO-3")]:
        with pytest.raises(ConfigError, match=rf"train.cuda_graphs: true: .*{fragment}"):
            validate(_config(tmp_path, **train), world_size=1, cuda_available=available, disk=False)
