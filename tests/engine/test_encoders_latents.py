"""Frozen encoders (timm, local weights) and latent spaces (identity, diffusers AutoencoderKL)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from engine.models.encoders import ALIASES, EncoderConfig, build_encoder
from engine.models.latents import LatentConfig, build_latent_space

timm = pytest.importorskip("timm")


SHALLOW = dict(model_kwargs=dict(depth=1))  # one transformer block keeps the CPU tests fast


def images(batch=2, size=64):
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)


def test_aliases_name_timm_dinov2_models():
    assert ALIASES["dinov2-vit-b"] == "vit_base_patch14_dinov2.lvd142m"
    assert ALIASES["dinov2-vit-g-reg"] == "vit_giant_patch14_reg4_dinov2.lvd142m"
    for name in ALIASES.values():
        assert timm.is_model(name.split(".")[0]), name
    assert EncoderConfig(resolution=256).input_size == 224 and EncoderConfig(resolution=512).input_size == 448


def test_random_encoder_shapes_and_repa_preprocessing():
    encoder = build_encoder(EncoderConfig(name="dinov2-vit-s", pretrained=False, resolution=64, **SHALLOW))  # input 56
    batch = images()
    patches, cls = encoder(batch)
    assert encoder.embed_dim == 384 and patches.shape == (2, 16, 384) and cls.shape == (2, 384)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.train().training
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = F.interpolate((batch / 255.0 - mean) / std, size=(56, 56), mode="bicubic", align_corners=False)
    tokens = encoder.model.forward_features(x)
    torch.testing.assert_close(patches, tokens[:, 1:])
    torch.testing.assert_close(cls, tokens[:, 0])


def test_registers_are_not_patch_tokens():
    encoder = build_encoder(EncoderConfig(name="dinov2-vit-s-reg", pretrained=False, resolution=64, **SHALLOW))
    patches, cls = encoder(images(1))
    assert encoder.num_prefix_tokens == 5 and patches.shape == (1, 16, 384)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_from_a_local_file_with_pos_embed_resampling(tmp_path, suffix):
    # A checkpoint at DINOv2's native 518 px (37 x 37 grid) loads into a 56 px (4 x 4) encoder.
    source = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, num_classes=0, img_size=518,
                               depth=1)
    with torch.no_grad():
        source.pos_embed.normal_()
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path))
    else:
        torch.save({"model": state}, path)
    encoder = build_encoder(EncoderConfig(name="dinov2-vit-s", weights_path=str(path), resolution=64, **SHALLOW))
    loaded = encoder.model.state_dict()
    torch.testing.assert_close(loaded["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    torch.testing.assert_close(loaded["cls_token"], state["cls_token"])
    expected = timm.layers.resample_abs_pos_embed(state["pos_embed"], new_size=[4, 4], num_prefix_tokens=1,
                                                  interpolation="bicubic", antialias=False)
    torch.testing.assert_close(loaded["pos_embed"], expected)
    with pytest.raises(ValueError, match="do not fit"):
        build_encoder(EncoderConfig(name="dinov2-vit-s", weights_path=str(path), resolution=64,
                                    model_kwargs=dict(depth=2)))


def test_missing_weights_are_a_clear_error(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors") as info:
        build_encoder(EncoderConfig(name="dinov2-vit-s", weights_path=str(missing), resolution=64))
    assert "pretrained: false" in str(info.value) and "huggingface-cli download" in str(info.value)
    with pytest.raises(FileNotFoundError, match="hub cache"):
        build_encoder(EncoderConfig(name="dinov2-vit-s", resolution=64))
    with pytest.raises(ValueError, match="timm"):
        build_encoder(EncoderConfig(name="not-a-model", pretrained=False))


def correctly_rounded_unit_range() -> torch.Tensor:
    """p / 127.5 - 1 for p = 0..255: the float32 nearest the exact quotient (ties to even), minus 1."""
    from fractions import Fraction

    import numpy as np

    out = []
    for p in range(256):
        exact = Fraction(2 * p, 255)
        near = np.float32(float(exact))
        candidates = [np.nextafter(near, np.float32(-1)), near, np.nextafter(near, np.float32(3))]
        best = min(candidates, key=lambda c: (abs(Fraction(float(c)) - exact), int(np.float32(c).view(np.int32)) & 1))
        out.append(best)
    return torch.from_numpy(np.array(out, np.float32)) - 1.0  # one float32 subtraction, exact on every device


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_unit_range_is_correctly_rounded_on_every_device(device):
    """Raw latent shards (engine.preprocess, on whatever device ran it) must hold the bits that online
    encoding computes on the training device: on CUDA a Python-number divisor became a multiplication by
    float32(1 / 127.5), 1 ulp off for 111 of the 256 values (H200, 2026-12-04), and raw shards written on
    the CPU differed from online encoding in 20% of the pixels."""
    from engine.models.latents import to_unit_range

    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16)
    got = to_unit_range(pixels.to(device)).cpu()
    want = correctly_rounded_unit_range().view(1, 1, 16, 16).expand(2, 3, 16, 16)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    # the reciprocal form CUDA used is what this test tells apart (so it is not vacuous on the CPU)
    reciprocal = (pixels.float() * torch.tensor(1 / 127.5, dtype=torch.float64).float() - 1.0).view(torch.int32)
    assert (reciprocal != want.view(torch.int32)).sum() == 2 * 3 * 111
    # the same bits as the division by a number on the CPU, where that is exact (frozen CPU numerics)
    assert torch.equal(got.view(torch.int32), (pixels.float() / 127.5 - 1.0).view(torch.int32))


def test_unit_range_divides_by_a_tensor_on_the_images_device():
    """The CPU cannot run CUDA's scalar-divisor path, so the call itself is checked: the divisor of
    to_unit_range's division is a tensor on the images' device, never a Python number or CPU scalar."""
    from torch.overrides import TorchFunctionMode

    from engine.models.latents import to_unit_range

    divisions = []

    class RecordDivisions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.__truediv__, torch.Tensor.div, torch.div, torch.true_divide):
                divisions.append(args[1])
            return func(*args, **(kwargs or {}))

    with RecordDivisions():
        to_unit_range(images(1, 4))
    assert len(divisions) == 1 and isinstance(divisions[0], torch.Tensor), divisions
    assert divisions[0].device == images(1, 4).device and divisions[0].dim() == 0


def test_identity_latent_space_round_trip():
    space = build_latent_space(LatentConfig(kind="identity", scale=2.0, shift=[0.1, 0.0, -0.1]))
    batch = images()
    mean, std = space.encode(batch)
    torch.testing.assert_close(mean, (batch / 127.5 - 1) * 2.0 + torch.tensor([0.1, 0.0, -0.1]).view(1, 3, 1, 1))
    assert torch.count_nonzero(std) == 0 and space.channels == 3 and space.downsample == 1
    torch.testing.assert_close(space.decode(mean), batch / 127.5 - 1)
    assert space.decode(mean * 10).abs().max() <= 1


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(str(path))
    return str(path), vae.eval()


def test_vae_latent_space_scales_per_channel(tiny_vae_dir):
    path, vae = tiny_vae_dir
    scale, shift = [0.5, 1.0, 2.0, 0.18215], [0.1, -0.2, 0.0, 0.3]
    space = build_latent_space(LatentConfig(kind="vae", path=path, scale=scale, shift=shift))
    assert space.channels == 4 and space.downsample == 2
    batch = images(2, 16)
    mean, std = space.encode(batch)
    with torch.no_grad():
        posterior = vae.encode(batch / 127.5 - 1).latent_dist
        s, b = torch.tensor(scale).view(1, 4, 1, 1), torch.tensor(shift).view(1, 4, 1, 1)
        torch.testing.assert_close(mean, posterior.mean * s + b)
        torch.testing.assert_close(std, posterior.std * s)
        latents = mean + std * torch.randn_like(std)
        torch.testing.assert_close(space.decode(latents), vae.decode((latents - b) / s).sample.clamp(-1, 1))
    assert mean.shape == (2, 4, 8, 8)


def test_latent_config_errors(tiny_vae_dir, tmp_path):
    with pytest.raises(ValueError, match="kind"):
        LatentConfig(kind="vqgan")
    with pytest.raises(ValueError, match="path"):
        LatentConfig(kind="vae")
    with pytest.raises(ValueError, match="scale"):
        LatentConfig(kind="identity", scale=0.0)
    with pytest.raises(ValueError, match="3 values for 4"):
        build_latent_space(LatentConfig(kind="vae", path=tiny_vae_dir[0], scale=[1.0, 1.0, 1.0]))
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        build_latent_space(LatentConfig(kind="vae", path=str(tmp_path / "missing")))


def test_module_latent_space_applies_scale_and_shift_around_the_users_autoencoder():
    import torch.nn.functional as F

    scale, shift = [0.5, 1.0, 2.0, 4.0], [0.1, -0.2, 0.0, 0.3]
    space = build_latent_space(LatentConfig(kind="module", path="tests.engine.toy_autoencoder:build",
                                            scale=scale, shift=shift))
    assert space.channels == 4 and space.downsample == 2
    batch = images(2, 8)
    mean, std = space.encode(batch)
    pooled = F.avg_pool2d(batch / 127.5 - 1, 2)
    raw = torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)
    s, b = torch.tensor(scale).view(1, 4, 1, 1), torch.tensor(shift).view(1, 4, 1, 1)
    torch.testing.assert_close(mean, raw * s + b)
    torch.testing.assert_close(std, 0.1 * raw.abs() * s)
    torch.testing.assert_close(space.decode(mean), F.interpolate(raw[:, :3], scale_factor=2).clamp(-1, 1))
    _, std = build_latent_space(LatentConfig(kind="module", path="tests.engine.toy_autoencoder:build_deterministic",
                                             scale=1.0)).encode(batch)
    assert torch.count_nonzero(std) == 0


@pytest.mark.parametrize("path, error, fragment", [
    ("tests.engine.toy_autoencoder", ValueError, "package.module:factory"),
    ("tests.engine.no_such_module:build", ImportError, "cannot import"),
    ("tests.engine.toy_autoencoder:nothing", AttributeError, "no callable 'nothing'"),
    ("tests.engine.toy_autoencoder:build_not_an_autoencoder", TypeError, "lacks"),
])
def test_module_latent_space_errors_name_the_problem(path, error, fragment):
    with pytest.raises(error, match=fragment):
        build_latent_space(LatentConfig(kind="module", path=path, scale=1.0))


def test_module_latent_space_checks_the_encoders_shape():
    space = build_latent_space(LatentConfig(kind="module", path="tests.engine.toy_autoencoder:build_wrong_shape",
                                            scale=1.0))
    with pytest.raises(ValueError, match=r"expected \(2, 3, 4, 4\)"):
        space.encode(images(2, 8))


def test_default_scale_follows_the_kind():
    """SD-VAE's 0.18215 is the default for a VAE only: pixel space and user autoencoders default to 1."""
    assert LatentConfig(kind="vae", path="x").scale == 0.18215
    assert LatentConfig(kind="identity").scale == 1.0
    assert LatentConfig(kind="module", path="a.b:c").scale == 1.0
    assert LatentConfig(kind="identity", scale=0.5).scale == 0.5


def _encoder_pair(name="dinov2-vit-s", resolution=64, depth=2):
    """The fused encoder and the reference one (fused: false) with the same random weights, both running
    their CUDA path (autocast_dtype bf16) on the CPU. dinov2-vit-s: head dim 64 as DINOv2-B; 56 px input
    gives 16 patches + the class token (N = 17, masked tails in the kernel's blocks)."""
    cfg = EncoderConfig(name=name, pretrained=False, resolution=resolution, model_kwargs=dict(depth=depth))
    fused = build_encoder(cfg)
    reference = build_encoder(dataclasses.replace(cfg, fused=False))
    reference.model.load_state_dict(fused.model.state_dict())
    for encoder in (fused, reference):
        with torch.no_grad():  # LayerScale's 1e-5 init would hide every block: give each branch weight
            for block in encoder.model.blocks:
                block.ls1.gamma.fill_(0.5)
                block.ls2.gamma.fill_(0.5)
        encoder.low_precision_devices = ("cuda", "cpu")
    return fused, reference


def _fp32(reference, batch):
    """The reference encoder's features in fp32 (its weights were never cast)."""
    reference.low_precision_devices = ("cuda",)
    try:
        return reference(batch)
    finally:
        reference.low_precision_devices = ("cuda", "cpu")


def test_fused_encoder_casts_matmul_weights_once_and_keeps_norms_fp32():
    fused, _ = _encoder_pair(depth=1)
    assert fused.kernel_attention == 1 and fused.weights_dtype is None
    fused(images())
    assert fused.weights_dtype == torch.bfloat16
    model = fused.model
    assert model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16 and model.patch_embed.proj.weight.dtype == torch.bfloat16
    assert model.blocks[0].norm1.weight.dtype == torch.float32 and model.norm.weight.dtype == torch.float32
    assert model.pos_embed.dtype == torch.float32 and model.blocks[0].ls1.gamma.dtype == torch.float32
    before = model.blocks[0].mlp.fc1.weight
    fused(images())
    assert model.blocks[0].mlp.fc1.weight is before  # not cast again
    assert "blocks.0.attn.qkv.weight" in model.state_dict()  # keys unchanged


def test_fused_encoder_under_torch_backend_is_bitwise_the_autocast_path():
    """The cast-once weights are the values autocast casts to on every call, and the "torch" backend's
    attention is the SDPA call timm makes: the features are identical."""
    import kernels

    fused, reference = _encoder_pair()
    batch = images()
    with kernels.use_backend("torch"):
        for actual, expected in zip(fused(batch), reference(batch)):
            assert actual.dtype == torch.float32 and torch.equal(actual, expected)


def test_fused_encoder_runs_the_attention_kernel_within_bf16_rounding(monkeypatch):
    """The Triton kernel (interpreter on the CPU) in every block; the features stay as close to the fp32
    encoder's as the reference bf16 autocast path's are, and within bf16 rounding of that path."""
    import importlib

    import kernels

    attention = importlib.import_module("kernels.attention")  # the module (the package's `attention` is the op)
    calls = []
    original = attention._attention_qkv

    def spy(qkv, *args):
        calls.append((qkv.dtype, tuple(qkv.shape)))
        return original(qkv, *args)

    monkeypatch.setattr(attention, "_attention_qkv", spy)
    fused, reference = _encoder_pair()
    batch = images()
    with kernels.use_backend("triton"):
        patches, cls = fused(batch)
        expected_patches, expected_cls = reference(batch)
    assert calls == [(torch.bfloat16, (2, 17, 3 * 384))] * 2  # each block's packed qkv, on the kernel
    exact_patches, exact_cls = _fp32(reference, batch)
    for actual, expected, exact in ((patches, expected_patches, exact_patches), (cls, expected_cls, exact_cls)):
        torch.testing.assert_close(actual, expected, atol=2e-2, rtol=2e-2)
        error, reference_error = (actual - exact).abs().mean(), (expected - exact).abs().mean()
        assert reference_error > 0 and error <= 1.5 * reference_error, (error, reference_error)


def test_fused_encoder_on_the_cpu_default_path_is_timms_fp32_code():
    """On the CPU (fp32, the frozen-numerics path) the fused switch changes nothing: no cast, timm's
    attention, the same bits as fused: false."""
    cfg = EncoderConfig(name="dinov2-vit-s", pretrained=False, resolution=64, **SHALLOW)
    fused = build_encoder(cfg)
    reference = build_encoder(dataclasses.replace(cfg, fused=False))
    reference.model.load_state_dict(fused.model.state_dict())
    batch = images()
    for actual, expected in zip(fused(batch), reference(batch)):
        assert torch.equal(actual, expected)
    assert fused.weights_dtype is None and fused.model.blocks[0].attn.qkv.weight.dtype == torch.float32
    assert not fused.model.blocks[0].attn.use_kernel and reference.kernel_attention == 0


def test_encoder_fused_must_be_a_bool():
    from engine.configurable import ConfigError

    with pytest.raises(ConfigError, match="fused"):
        EncoderConfig(fused="yes")
