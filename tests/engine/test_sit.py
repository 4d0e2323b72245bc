"""SiT: presets, checkpoint layout, the REPA forward, adaLN-Zero init, backends, config errors."""
import math
import sys

import pytest
import torch

import kernels
from engine.models import PRESETS, ModelConfig, SiT_models, build_model
from engine.models.sit import sincos_pos_embed_2d
from engine.transport import Transport, TransportConfig
from tests.engine.common import randomize, repa_forward, repa_state_dict_shapes, tiny_config, tiny_model
from tests.helpers import assert_close


def meta_model(**overrides):
    with torch.device("meta"):
        return build_model(ModelConfig(**overrides))


@pytest.mark.parametrize("name, millions", [("SiT-XL/2", 675.1), ("SiT-L/2", 458.1), ("SiT-B/2", 130.5),
                                            ("SiT-S/2", 33.0)])
def test_preset_parameter_counts(name, millions):
    # Published sizes without projectors (DiT/SiT papers: XL/2 675M, L/2 458M, B/2 130M, S/2 33M).
    model = meta_model(name=name, z_dims=[768])
    assert model.num_parameters(exclude_projectors=True) / 1e6 == pytest.approx(millions, abs=0.15)
    projector = 1152 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 768 + 768 if name == "SiT-XL/2" else None
    if projector:
        assert model.num_parameters() - model.num_parameters(exclude_projectors=True) == projector


def test_preset_table_and_factories():
    assert set(SiT_models) == {f"SiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (1, 2, 4, 8)}
    with torch.device("meta"):
        model = SiT_models["SiT-L/4"](z_dims=[])
    assert (model.cfg.depth, model.cfg.hidden_size, model.cfg.num_heads, model.cfg.patch_size) == (24, 1024, 16, 4)
    assert model.pos_embed.shape == (1, 64, 1024) and len(model.projectors) == 0
    assert PRESETS["SiT-B/8"] == (12, 768, 12, 8)
    assert model.cfg.encoder_depth == 8 and ModelConfig(name="SiT-B/2").encoder_depth == 4


@pytest.mark.parametrize("options", [dict(), dict(qk_norm=True), dict(reg=True, z_dims=[768, 1024]),
                                     dict(class_dropout_prob=0.0, z_dims=[])])
def test_state_dict_matches_public_repa_layout(options):
    model = meta_model(name="SiT-XL/2", **options)
    expected = repa_state_dict_shapes(model.cfg)
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(actual) == sorted(expected)
    assert actual == expected


@pytest.mark.parametrize("options", [dict(), dict(qk_norm=True), dict(reg=True, z_dims=[24, 16])])
def test_repa_checkpoint_loads_strict_and_matches_reference_forward(options):
    cfg = tiny_config(**options)
    shapes = repa_state_dict_shapes(cfg)
    state = {k: torch.randn(s) * 0.3 for k, s in shapes.items()}
    model = build_model(cfg).eval()
    model.load_state_dict(state, strict=True)
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 10])  # 10: the null class
    cls = torch.randn(3, cfg.z_dims[0]) if cfg.reg else None
    with torch.no_grad(), kernels.use_backend("torch"):
        out = model(x, t, y, cls_token=cls)
        ref = repa_forward(state, cfg, x, t, y, cls)
    assert len(out) == len(ref) == (3 if cfg.reg else 2)
    assert_close(out[0], ref[0], name="velocity")
    for z, z_ref in zip(out[1], ref[1]):
        assert_close(z, z_ref, name="zs")
    if cfg.reg:
        assert out[1][0].shape == (3, 17, 24)  # the class token is aligned as well
        assert_close(out[2], ref[2], name="cls velocity")


def test_outputs_are_zero_at_init_and_projectors_are_not():
    model = tiny_model(reg=True, car_flow="joint").eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    v, zs, v_cls = model(x, t, y, cls_token=torch.randn(2, 24))
    assert torch.count_nonzero(v) == 0 and torch.count_nonzero(v_cls) == 0
    assert zs[0].abs().sum() > 0
    mu0, mu1 = model.car_flow_shifts(y)
    assert torch.count_nonzero(mu0) == 0 and torch.count_nonzero(mu1) == 0
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0


def test_sincos_pos_embed_layout():
    D, g = 16, 4
    pos = sincos_pos_embed_2d(D, g, extra_tokens=1)
    assert pos.shape == (1 + g * g, D) and torch.count_nonzero(pos[0]) == 0
    omega = 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D // 4))
    for row in range(g):
        for col in range(g):
            expected = torch.cat([torch.sin(col * omega), torch.cos(col * omega),
                                  torch.sin(row * omega), torch.cos(row * omega)]).float()
            torch.testing.assert_close(pos[1 + row * g + col], expected)


def test_label_dropout_only_through_drop_labels():
    """drop_labels drops at the class dropout rate; the forward itself never drops (in training the
    objective, engine.transport, drops the labels and passes the result to the model and the shifts)."""
    model = randomize(tiny_model(class_dropout_prob=0.5))
    y = torch.arange(10).repeat(50)
    dropped = model.drop_labels(y)
    fraction = (dropped == 10).float().mean().item()
    assert 0.4 < fraction < 0.6 and torch.equal(dropped[dropped != 10], y[dropped != 10])
    x, t, labels = torch.randn(1, 4, 8, 8).expand(64, -1, -1, -1), torch.full((64,), 0.5), torch.full((64,), 3)
    with torch.no_grad():
        model.eval()
        cond = model(x[:1], t[:1], labels[:1])[0]
        null = model(x[:1], t[:1], torch.tensor([10]))[0]
        assert not torch.allclose(cond, null)
        assert torch.allclose(model(x, t, labels)[0], cond.expand(64, -1, -1, -1), atol=1e-5)
        model.train()
        assert torch.allclose(model(x, t, labels)[0], cond.expand(64, -1, -1, -1), atol=1e-5)
        out = model(x, t, model.drop_labels(labels))[0].flatten(1)
        is_null = torch.isclose(out, null.flatten(1), atol=1e-5).all(1)
        is_cond = torch.isclose(out, cond.flatten(1), atol=1e-5).all(1)
        assert torch.all(is_null ^ is_cond) and 10 < int(is_null.sum()) < 54
    no_null = tiny_model(class_dropout_prob=0.0)
    assert no_null.null_class is None and no_null.y_embedder.embedding_table.weight.shape[0] == 10


def test_single_block_forward_equals_model_chain():
    # SiTBlock.forward (unfused) and the model's fused residual chain compute the same thing.
    model = randomize(tiny_model(z_dims=[], depth=3)).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 4])
    with torch.no_grad():
        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y)
        for block in model.blocks:
            h = block(h, c)
        shift, scale = model.final_layer.modulation(c)
        f = kernels.reference_adaln_modulate(h, shift, scale)
        expected = model.unpatchify(model.final_layer.linear(f))
        assert_close(model(x, t, y)[0], expected)


def _loss_and_grads(model, batch, backend):
    x, y, z, noise, t = batch
    model.zero_grad(set_to_none=True)
    with kernels.use_backend(backend):
        losses = Transport(TransportConfig(path="cosine")).training_losses(model, x, y, [z], noise=noise, t=t)
    losses["loss"].backward()
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _counting(apply, calls, name):
    def wrapped(*args):
        calls.append(name)
        return apply(*args)
    return wrapped


@pytest.mark.parametrize("shift_shape, qk_norm", [("full", False), ("channel", True)])
def test_reference_and_kernel_backends_agree(monkeypatch, device, shift_shape, qk_norm):
    # Tiny on purpose: on the CPU the Triton kernels run in the interpreter. Head dim 16 is the
    # attention kernel's smallest.
    model = randomize(tiny_model(hidden_size=32, num_heads=2, input_size=4, z_dims=[8], projector_dim=16,
                                 car_flow="joint", car_flow_rank=4, car_flow_shape=shift_shape,
                                 qk_norm=qk_norm), scale=0.1).eval().to(device)
    batch = tuple(t.to(device) for t in (torch.randn(2, 4, 4, 4), torch.tensor([1, 7]), torch.randn(2, 4, 8),
                                         torch.randn(2, 4, 4, 4), torch.rand(2)))
    reference, ref_grads = _loss_and_grads(model, batch, "torch")
    calls = []
    fused_ops = (("kernels.interpolant", "_interpolant"), ("kernels.interpolant", "_velocity_loss"),
                 ("kernels.alignment_loss", "_alignment_cos"), ("kernels.adaln", "_adaln_modulate"),
                 ("kernels.adaln", "_adaln_residual_modulate"), ("kernels.attention", "_attention_qkv"),
                 ("kernels.gelu", "_gelu_tanh"))
    for module_name, op in fused_ops:
        function = getattr(sys.modules[module_name], op).eager  # the eager autograd.Function
        monkeypatch.setattr(function, "apply", _counting(function.apply, calls, op))
    fused, fused_grads = _loss_and_grads(model, batch, "triton")
    assert sorted(set(calls)) == sorted(op for _, op in fused_ops)  # every kernel really ran
    for key in reference:
        assert_close(fused[key], reference[key], name=key)
    assert ref_grads.keys() == fused_grads.keys() and "car_source_shift.net.3.weight" in ref_grads
    for name, grad in ref_grads.items():
        assert_close(fused_grads[name], grad, scale=max(1.0, float(grad.abs().max())), name=name)


@pytest.mark.parametrize("key, value, fragment", [
    ("name", "SiT-XXL/2", "name"), ("car_flow", "both", "car_flow"), ("hidden_size", 30, "hidden_size"),
    ("input_size", 7, "input_size"), ("encoder_depth", 5, "encoder_depth"), ("z_dims", [0], "z_dims"),
    ("class_dropout_prob", 1.0, "class_dropout_prob"),
])
def test_config_errors_name_key_and_value(key, value, fragment):
    with pytest.raises(ValueError, match=fragment) as info:
        tiny_config(**{key: value})
    assert str(info.value).startswith(f"{key}: {value!r}: ")  # key: value: what is allowed


def test_config_reg_needs_encoder_and_unknown_keys():
    with pytest.raises(ValueError, match="reg"):
        tiny_config(reg=True, z_dims=[])
    with pytest.raises(ValueError, match="hidden: not a known key"):
        ModelConfig.from_dict({"name": "SiT-B/2", "hidden": 3})


def test_car_flow_shift_networks_are_small():
    model = meta_model(name="SiT-XL/2", car_flow="joint")
    total = model.num_parameters()
    for net in model.shift_nets():
        assert sum(p.numel() for p in net.parameters()) < 0.001 * total
    assert model.car_source_shift.shape == (4, 32, 32)
    assert meta_model(name="SiT-B/2", car_flow="target", car_flow_shape="channel").car_target_shift.shape == (4, 1, 1)


def test_reg_model_requires_class_token():
    model = tiny_model(reg=True)
    with pytest.raises(ValueError, match="cls_token"):
        model(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0]))
    with pytest.raises(ValueError, match="reg=True"):
        tiny_model()(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0]), cls_token=torch.randn(1, 24))


def test_flops_estimate_is_dominated_by_blocks():
    model = meta_model(name="SiT-XL/2", z_dims=[])
    # 2 * params * tokens for the block matmuls, plus attention scores (Kaplan-style estimate).
    block_params = 28 * 12 * 1152 ** 2
    approx = 2 * block_params * 256 + 28 * 4 * 256 * 256 * 1152
    assert model.flops_per_sample() == pytest.approx(approx, rel=0.01)
    assert math.isfinite(model.flops_per_sample())


def test_load_weights_from_repa_style_checkpoint(tmp_path):
    from engine.models import load_weights
    source = randomize(tiny_model())
    path = tmp_path / "0400000.pt"
    torch.save({"model": {"module." + k: v for k, v in source.state_dict().items()},
                "ema": source.state_dict(), "opt": {}, "steps": 4}, path)
    target = tiny_model()
    load_weights(target, str(path))
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    other = tiny_model()
    load_weights(other, str(path), key="model")
    assert torch.equal(other.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_weights(tiny_model(reg=True), str(path))


def test_grad_checkpointing_gives_the_same_gradients():
    plain = randomize(tiny_model(depth=3, encoder_depth=2)).train()
    checkpointed = tiny_model(depth=3, encoder_depth=2, grad_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    x, t, y, z = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]), torch.randn(2, 16, 24)
    grads = []
    for model in (plain, checkpointed):
        v, zs = model(x, t, y)
        (v.square().mean() + kernels.alignment_loss(zs, [z])).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_the_residual_stream_takes_the_weights_dtype(device):
    """Under bf16 autocast with fp32 weights (REPA's setup) the residual stream stays fp32, as in REPA's
    code, where the fp32 pos_embed promotes it; the fused kernels then run with an fp32 residual and bf16
    branches and agree with the PyTorch ops, forward and backward. With bf16 weights (DeepSpeed's bf16
    mode) it is bf16."""
    model = randomize(tiny_model(hidden_size=32, num_heads=2, input_size=4, z_dims=[8], projector_dim=16),
                      scale=0.1).to(device)
    x, t, y = torch.randn(2, 4, 4, 4, device=device), torch.rand(2, device=device), torch.tensor([1, 7], device=device)
    seen = []
    model.projectors[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    results = {}
    for backend in ("triton", "torch"):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16), kernels.use_backend(backend):
            velocity, zs = model(x, t, y)
        (velocity.float().square().mean() + zs[0].float().mean()).backward()
        results[backend] = [velocity, zs[0]] + [p.grad for p in model.parameters() if p.grad is not None]
    assert len(results["triton"]) == len(results["torch"]) > 10
    for i, (fused, reference) in enumerate(zip(results["triton"], results["torch"])):
        assert_close(fused.float(), reference.float(), torch.bfloat16, name=f"result {i}")
    with torch.no_grad(), kernels.use_backend("triton"):
        model.bfloat16()(x.bfloat16(), t.bfloat16(), y)
    assert seen == [torch.float32, torch.float32, torch.bfloat16]
