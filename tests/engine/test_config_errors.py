"""Malformed configurations, table-driven: each one is refused by what `--validate-only` runs
(`load_config` + `validate`, here in-process) with one `ConfigError` line that names the key, and the
file and line where the key was written."""
import os
import re

import pytest
import yaml

from engine.config import ConfigError, load_config, validate
from tests.engine.trainer_fixtures import tiny_config

NAN, INF = float("nan"), float("inf")

# (section, key, value, the key the error must name, a fragment of what is allowed)
VALUES = [
    ("train", "max_steps", 0, "train.max_steps", ">= 1"),
    ("train", "max_steps", -1, "train.max_steps", ">= 1"),
    ("train", "max_steps", "ten", "train.max_steps", "an integer"),
    ("train", "max_steps", 1.5, "train.max_steps", "an integer"),
    ("train", "global_batch_size", 0, "train.global_batch_size", ">= 1"),
    ("train", "global_batch_size", 7, "train.global_batch_size", "a multiple of"),
    ("train", "max_minutes", 0, "train.max_minutes", "positive"),
    ("train", "max_minutes", NAN, "train.max_minutes", "positive"),
    ("train", "precision", "bf32", "train.precision", "'bf16'"),
    ("train", "device", "tpu", "train.device", "'cpu'"),
    ("train", "device", "cuda", "train.device", "without CUDA"),
    ("train", "kernels_backend", "cuda", "train.kernels_backend", "on the CPU"),
    ("train", "zero_stage", 4, "train.zero_stage", "0, 1, 2, 3"),
    ("train", "zero_stage", -1, "train.zero_stage", "0, 1, 2, 3"),
    ("train", "seed", -1, "train.seed", ">= 0"),
    ("train", "max_nonfinite_in_row", 0, "train.max_nonfinite_in_row", ">= 1"),
    ("train", "grad_accum_steps", 0, "train.grad_accum_steps", "positive"),
    ("train", "grad_accum_steps", 3, "train.global_batch_size", "= 12"),
    ("train", "deepspeed_config", "configs/deepspeed/zero9.json", "train.deepspeed_config", "existing DeepSpeed"),
    ("train", "output_dir", "", "train.output_dir", "a directory"),
    ("train", "compile", "yes", "train.compile", "true or false"),
    ("train", "debug_nonfinite_steps", 3, "train.debug_nonfinite_steps", "a list of an integer"),
    ("optim", "lr", -1e-4, "optim.lr", "finite positive"),
    ("optim", "lr", 0.0, "optim.lr", "finite positive"),
    ("optim", "lr", INF, "optim.lr", "finite positive"),
    ("optim", "lr", NAN, "optim.lr", "finite positive"),
    ("optim", "lr", "fast", "optim.lr", "a number"),
    ("optim", "eps", -1e-8, "optim.eps", "finite positive"),
    ("optim", "eps", NAN, "optim.eps", "finite positive"),
    ("optim", "eps", 0.0, "optim.eps", "finite positive"),
    ("optim", "weight_decay", -0.1, "optim.weight_decay", ">= 0"),
    ("optim", "weight_decay", INF, "optim.weight_decay", ">= 0"),
    ("optim", "grad_clip", NAN, "optim.grad_clip", ">= 0"),
    ("optim", "grad_clip", -1.0, "optim.grad_clip", ">= 0"),
    ("optim", "betas", [0.9], "optim.betas", "two numbers"),
    ("optim", "betas", [0.9, 1.0], "optim.betas", "[0, 1)"),
    ("optim", "warmup_steps", -1, "optim.warmup_steps", ">= 0"),
    ("optim", "fused", "true", "optim.fused", "on the CPU"),
    ("optim", "fused_clip", "maybe", "optim.fused_clip", "'auto'"),
    ("optim", "step_kernel", "cutlass", "optim.step_kernel", "'torch'"),
    ("optim", "step_kernel", "alignflow", "optim.step_kernel", "unless optim.fused_clip is on"),
    ("ema", "decay", 1.0, "ema.decay", "[0, 1)"),
    ("ema", "decay", -0.1, "ema.decay", "[0, 1)"),
    ("ema", "decay", NAN, "ema.decay", "[0, 1)"),
    ("ema", "enabled", "no", "ema.enabled", "true or false"),
    ("checkpoint", "every", -1, "checkpoint.every", ">= 0"),
    ("checkpoint", "keep_last", 0, "checkpoint.keep_last", ">= 1"),
    ("checkpoint", "resume", "", "checkpoint.resume", "'auto'"),
    ("checkpoint", "resume", "/nonexistent/checkpoints", "checkpoint.resume", "existing checkpoint directory"),
    ("logging", "log_every", 0, "logging.log_every", ">= 1"),
    ("logging", "sample_every", -1, "logging.sample_every", ">= 0"),
    ("sample", "method", "ddim", "sample.method", "euler"),
    ("sample", "num_steps", 0, "sample.num_steps", ">= 1"),
    ("sample", "cfg_scale", NAN, "sample.cfg_scale", "finite"),
    ("sample", "seed", -1, "sample.seed", ">= 0"),
    ("sample", "batch_size", 0, "sample.batch_size", ">= 1"),
    ("eval", "method", "ddim", "eval.method", "euler"),
    ("eval", "cfg_scale", -1.0, "eval.cfg_scale", ">= 0"),
    ("sample", "guidance_low", -0.1, "sample.guidance_low", "in [0, 1]"),
    ("sample", "guidance_low", 1.5, "sample.guidance_low", "in [0, 1]"),
    ("sample", "guidance_low", NAN, "sample.guidance_low", "in [0, 1]"),
    ("sample", "guidance_high", 1.01, "sample.guidance_high", "in [guidance_low=0.0, 1]"),
    ("sample", "guidance_high", "high", "sample.guidance_high", "a number"),
    ("eval", "guidance_high", -0.5, "eval.guidance_high", "in [guidance_low=0.0, 1]"),
    ("model", "name", "SiT-XXL/2", "model.name", "SiT-XL/2"),
    ("model", "hidden_size", 30, "model.hidden_size", "a multiple of 4"),
    ("model", "num_heads", 3, "model.hidden_size", "multiple of num_heads=3"),
    ("model", "car_flow", "both", "model.car_flow", "joint"),
    ("model", "encoder_depth", 5, "model.encoder_depth", "depth=2"),
    ("model", "input_size", 7, "model.input_size", "multiple of patch_size"),
    ("model", "class_dropout_prob", 1.0, "model.class_dropout_prob", "[0, 1)"),
    ("model", "num_classes", 7, "data.num_classes", "model.num_classes=7"),
    ("model", "in_channels", 4, "model.in_channels", "3 (latent.kind='identity'"),
    ("model", "z_dims", [64, 64], "encoders", "one encoder per model.z_dims"),
    ("transport", "path", "cubic", "transport.path", "linear"),
    ("transport", "time_shift", 0.0, "transport.time_shift", "positive"),
    ("transport", "proj_coeff", -1.0, "transport.proj_coeff", ">= 0"),
    ("transport", "lognormal_std", NAN, "transport.lognormal_std", "positive"),
    ("data", "source", "imagenet", "data.source", "folder"),
    ("data", "decoder", "nvjpeg", "data.decoder", "dali"),
    ("data", "resolution", 4, "data.resolution", ">= 8"),
    ("data", "resolution", 32, "model.input_size", "32 (latent.kind='identity'"),
    ("data", "batch_size", 0, "data.batch_size", ">= 1"),
    ("data", "on_corrupt", "ignore", "data.on_corrupt", "skip"),
    ("data", "seed", -1, "data.seed", ">= 0"),
    ("data", "latents_root", "/nonexistent/latents", "data.latents_root", "engine.preprocess"),
    ("latent", "kind", "gan", "latent.kind", "identity"),
    ("latent", "scale", 0.0, "latent.scale", "non-zero"),
    ("latent", "scale", NAN, "latent.scale", "finite"),
    ("train", "max_step", 3, "train.max_step", "not a known key"),
]

ENCODER = [
    ("name", "no_such_vit", "encoders[0].name", "timm"),
    ("autocast_dtype", "fp8", "encoders[0].autocast_dtype", "bfloat16"),
    ("weights_path", "/nonexistent/encoder.safetensors", "encoders[0].weights_path", "existing weights file"),
    ("pretrained", "yes", "encoders[0].pretrained", "true or false"),
    ("weight_path", "x", "encoders[0].weight_path", "not a known key"),
]


def base(tmp_path) -> dict:
    return tiny_config(tmp_path / "run", tmp_path / "data")


def refused(tmp_path, raw_or_text, key: str | None, allowed: str, line_known: bool = True) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(raw_or_text if isinstance(raw_or_text, str) else yaml.safe_dump(raw_or_text, sort_keys=False))
    with pytest.raises(ConfigError) as info:
        validate(load_config(str(path)), world_size=1, cuda_available=False)
    message = f"config error: {info.value}"  # what the CLI prints
    assert "\n" not in message, message
    where = re.escape(str(path)) + (r":\d+" if line_known else "")
    assert re.match(rf"config error: {where}: ", message), message
    if key is not None:
        assert f": {key}: " in message, f"{key!r} not named in {message!r}"
    assert allowed in message, f"{allowed!r} not in {message!r}"
    return message


@pytest.mark.parametrize("section, key, value, named, allowed", VALUES,
                         ids=[f"{s}.{k}={v!r}" for s, k, v, _, _ in VALUES])
def test_bad_value_is_one_line_naming_the_key(tmp_path, section, key, value, named, allowed):
    raw = base(tmp_path)
    raw[section] = {**raw.get(section, {}), key: value}
    refused(tmp_path, raw, named, allowed)


def test_guidance_low_above_high_names_high(tmp_path):
    raw = base(tmp_path)
    raw["sample"] = {**raw["sample"], "guidance_low": 0.6, "guidance_high": 0.4}
    refused(tmp_path, raw, "sample.guidance_high", "a number in [guidance_low=0.6, 1]")


@pytest.mark.parametrize("key, value, named, allowed", ENCODER, ids=[f"{k}={v!r}" for k, v, _, _ in ENCODER])
def test_bad_encoder_is_one_line_naming_the_key(tmp_path, key, value, named, allowed):
    raw = base(tmp_path)
    raw["encoders"][0][key] = value
    if key == "weights_path":
        raw["encoders"][0]["pretrained"] = True
    refused(tmp_path, raw, named, allowed)


def test_the_line_is_where_the_key_was_written(tmp_path):
    raw = base(tmp_path)
    raw["optim"]["lr"] = -1.0
    text = yaml.safe_dump(raw, sort_keys=False)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if row.strip().startswith("lr:"))
    message = refused(tmp_path, text, "optim.lr", "finite positive")
    assert message.startswith(f"config error: {tmp_path / 'bad.yaml'}:{line}: optim.lr: -1.0: ")
    # a check across sections names the key it refuses
    raw = base(tmp_path)
    raw["sample"] = {**raw["sample"], "cfg_scale": 2.0}
    raw["model"]["class_dropout_prob"] = 0.0
    refused(tmp_path, raw, "sample.cfg_scale", "label dropout")


def other_cases(tmp_path):
    text = yaml.safe_dump(base(tmp_path), sort_keys=False)
    data_at = text.index("data:")
    folder = base(tmp_path)
    folder["data"] = {**folder["data"], "source": "folder", "root": str(tmp_path / "no_images")}
    webdataset = base(tmp_path)
    webdataset["data"] = {**webdataset["data"], "source": "webdataset", "root": str(tmp_path / "no_shards")}
    module = base(tmp_path)
    module["latent"] = {"kind": "module", "path": "tests.engine.no_such_module:build", "scale": 1.0}
    factory = base(tmp_path)
    factory["latent"] = {"kind": "module", "path": "tests.engine.toy_autoencoder:nothing", "scale": 1.0}
    not_module = base(tmp_path)
    not_module["latent"] = {"kind": "module", "path": "tests.engine.toy_autoencoder", "scale": 1.0}
    (tmp_path / "a_file").write_text("x")
    output_file = base(tmp_path)
    output_file["train"]["output_dir"] = str(tmp_path / "a_file")
    output_below_file = base(tmp_path)
    output_below_file["train"]["output_dir"] = str(tmp_path / "a_file" / "run")
    unknown_section = dict(base(tmp_path), optimizer={"lr": 1.0})
    encoders_not_list = dict(base(tmp_path), encoders={"name": "test_vit"})
    section_not_mapping = dict(base(tmp_path), train=3)
    (tmp_path / "ds.json").write_text('{"optimizer": {"type": "Adam"}}')
    owned = base(tmp_path)
    owned["train"]["deepspeed_config"] = str(tmp_path / "ds.json")
    (tmp_path / "ds_bad.json").write_text('{"train_batch_size": ')
    unreadable_json = base(tmp_path)
    unreadable_json["train"]["deepspeed_config"] = str(tmp_path / "ds_bad.json")
    return [
        ("tab", text.replace("  lr:", "\tlr:"), None, "tabs"),
        ("bad indent", text.replace("  lr:", "      lr:", 1), None, "YAML syntax error"),
        ("unclosed bracket", text.replace("z_dims:\n  - 64", "z_dims: [64"), None, "YAML syntax error"),
        ("empty", "", None, "the file is empty"),
        ("only comments", "# nothing here\n", None, "the file is empty"),
        ("top-level list", "- model\n- data\n", None, "mapping of sections"),
        ("duplicate section", text[:data_at] + "data: {}\n" + text[data_at:], "data", "duplicate key"),
        ("duplicate key", text.replace("  lr:", "  lr: 0.1\n  lr:", 1), "optim.lr", "duplicate key"),
        ("folder root missing", folder, "data.root", "an existing directory"),
        ("webdataset root missing", webdataset, "data.root", ".tar"),
        ("module does not import", module, "latent.path", "importable module"),
        ("module without factory", factory, "latent.path", "no 'nothing'"),
        ("module path form", not_module, "latent.path", "package.module:factory"),
        ("output dir is a file", output_file, "train.output_dir", "is a file"),
        ("output dir below a file", output_below_file, "train.output_dir", "is a file"),
        ("unknown section", unknown_section, "optimizer", "not a known key"),
        ("encoders not a list", encoders_not_list, "encoders", "a list of"),
        ("section not a mapping", section_not_mapping, "train", "a mapping"),
        ("deepspeed owns optimizer", owned, "train.deepspeed_config", "without a 'optimizer' section"),
        ("deepspeed json unreadable", unreadable_json, "train.deepspeed_config", "readable JSON"),
    ]


OTHER_IDS = ["tab", "bad indent", "unclosed bracket", "empty", "only comments", "top-level list",
             "duplicate section", "duplicate key", "folder root missing", "webdataset root missing",
             "module does not import", "module without factory", "module path form", "output dir is a file",
             "output dir below a file", "unknown section", "encoders not a list", "section not a mapping",
             "deepspeed owns optimizer", "deepspeed json unreadable"]


@pytest.mark.parametrize("case", OTHER_IDS)
def test_bad_file_or_path_is_one_line(tmp_path, case):
    cases = {name: rest for name, *rest in other_cases(tmp_path)}
    raw, key, allowed = cases[case]
    refused(tmp_path, raw, key, allowed, line_known=case not in ("empty", "only comments"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write any directory, so unwritable needs another user")
def test_unwritable_output_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    raw = base(tmp_path)
    raw["train"]["output_dir"] = str(locked / "run")
    refused(tmp_path, raw, "train.output_dir", "not writable")


def test_overrides_are_placed_on_the_command_line(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(base(tmp_path), sort_keys=False))
    with pytest.raises(ConfigError) as info:
        validate(load_config(str(path), ["optim.lr=-1"]), cuda_available=False)
    assert str(info.value) == "<command line>: optim.lr: -1.0: a finite positive number"
    with pytest.raises(ConfigError, match=r"^<command line>: 'optim.lr': an override must look like"):
        load_config(str(path), ["optim.lr"])
    assert load_config(str(path), ["optim.lr=3e-4"]).optim.lr == 3e-4


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^--config: '.*nope.yaml': an existing YAML file$"):
        load_config(str(tmp_path / "nope.yaml"))
