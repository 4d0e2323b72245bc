"""Checkpoints are loaded with torch.load(weights_only=True): a file that would run code when
unpickled is refused naming it, and the code never runs. A config inside a checkpoint may not name a
module to import unless the user names it too."""

import pytest
import torch

from engine import checkpoint as ckpt
from engine.configurable import ConfigError


class WritesMarker:
    """Unpickling this calls open(marker, 'w'): what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_file(path, marker, wrap=lambda payload: payload):
    torch.save(wrap({"weights": torch.zeros(2), "payload": WritesMarker(marker)}), str(path))
    return str(path)


def test_the_crafted_pickle_does_run_code_without_weights_only(tmp_path):
    # the test's own check: loading it the unsafe way writes the marker
    marker = tmp_path / "unsafe_marker"
    torch.load(evil_file(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("what", ["safe_load", "ema_export", "sit_weights", "deepspeed_engine"])
def test_code_in_a_checkpoint_is_refused_and_never_runs(tmp_path, what):
    marker = tmp_path / "marker"
    if what == "safe_load":
        path = evil_file(tmp_path / "trainer_rank0.pt", marker)
        call = lambda: ckpt.safe_load(path, "trainer state")  # noqa: E731
    elif what == "ema_export":
        path = evil_file(tmp_path / ckpt.EMA_FILE, marker, lambda p: {"ema": p, "steps": 1, "config": {}})
        call = lambda: ckpt.load_ema_export(path)  # noqa: E731
    elif what == "sit_weights":
        from engine.models import ModelConfig, build_model, load_weights

        path = evil_file(tmp_path / "repa.pt", marker, lambda p: {"ema": p})
        model = build_model(ModelConfig(name="SiT-S/4", input_size=8, in_channels=3, num_classes=2, hidden_size=32,
                                        depth=1, num_heads=2, z_dims=[], encoder_depth=1))
        call = lambda: load_weights(model, path)  # noqa: E731
    else:
        path = evil_file(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
        engine = ckpt._WeightsOnlyCheckpointEngine(inner=None)
        call = lambda: engine.load(path, map_location=torch.device("cpu"))  # noqa: E731
    with pytest.raises(Exception) as info:
        call()
    assert not marker.exists(), "the checkpoint ran code while loading"
    assert "builtins.open" in str(info.value) or "weights" in str(info.value).lower()
    if what != "sit_weights":
        assert isinstance(info.value, ckpt.UnsafeCheckpointError)
        assert path in str(info.value) and "trust" in str(info.value)


def test_trainer_state_round_trips_with_weights_only(tmp_path):
    import random

    import numpy as np

    state = ckpt.rng_state()
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    expected = (random.random(), np.random.rand(3), torch.rand(3))
    random.random(), np.random.rand(5), torch.rand(7)  # move every generator on
    ckpt.set_rng_state(ckpt.safe_load(str(path)))
    got = (random.random(), np.random.rand(3), torch.rand(3))
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])
    torch.testing.assert_close(got[2], expected[2], rtol=0, atol=0)


def test_checkpoint_config_cannot_name_a_module_to_import(tmp_path, monkeypatch):
    from engine.images import guard_imports, load_for_sampling

    marker = tmp_path / "imported"
    (tmp_path / "evil_latents.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef build(cfg): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from engine.config import from_dict
    from engine.models import build_model
    from tests.engine.trainer_fixtures import tiny_config

    raw = tiny_config(tmp_path / "run", tmp_path / "data")
    state = build_model(from_dict(raw).model).state_dict()
    raw["latent"] = {"kind": "module", "path": "evil_latents:build", "scale": 1.0}
    export = tmp_path / ckpt.EMA_FILE
    torch.save({"ema": state, "steps": 1, "config": raw}, export)
    with pytest.raises(ConfigError, match=r"^latent.path: 'evil_latents:build': a module you name yourself.*"
                                          r"--latent-module evil_latents:build"):
        load_for_sampling(str(export), torch.device("cpu"), ["sample.num_steps=2"])
    assert not marker.exists(), "a checkpoint's config imported a module"
    guard_imports({"latent": {"kind": "module", "path": "evil_latents:build"}},
                  ["latent.path=evil_latents:build"], str(export))  # the user named it: allowed
    guard_imports({"latent": {"kind": "identity"}}, [], str(export))
