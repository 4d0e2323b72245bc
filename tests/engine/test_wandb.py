"""wandb logging (logging.wandb), offline: the scalars of metrics.jsonl, the sample grids and the config
reach the run, and a resumed run continues the same wandb run (its id is stored in the checkpoint).
The run's transaction log (`run-<id>.wandb`) is read back record by record."""
import glob
import json
import os
import struct

import pytest

import kernels
from engine.config import ConfigError, from_dict, validate
from tests.engine.trainer_fixtures import tiny_config

wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[wandb]')")


def wandb_records(path):
    """Records of a .wandb transaction log: LevelDB's log format (a 7-byte ':W&B' file header, 32 KiB
    blocks of records, each with a 7-byte header crc32 / length / type: FULL 1, FIRST 2, MIDDLE 3, LAST 4)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # the zero padding at the end of a block
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk if kind == 4 else chunk)
            pending = b""
            yield record
        else:
            pending += chunk


def read_run(run_dir):
    """(run id, config keys, {step: {key: value}}) of one offline run directory."""
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    run_id, config, history = None, set(), {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config |= {item.key for item in record.run.config.update}
        elif kind == "config":
            config |= {item.key for item in record.config.update}
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            history[int(row["_step"])] = row
    return run_id, config, history


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb_home"))
    import tempfile
    os.makedirs(tmp_path / "tmp")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # wandb's media staging folders
    # The one-rank group the Trainer joins stays up (as within test_train.py, which runs after this file and
    # ends it): a group ended under DeepSpeed leaves it a stale world-group clone.
    with kernels.use_backend(kernels.get_backend()):
        yield


def test_scalars_grids_config_and_resume_reach_one_wandb_run(tmp_path, wandb_env):
    from engine.trainer import Trainer

    def run(max_steps):
        raw = tiny_config(tmp_path / "run", tmp_path / "data", train={"max_steps": max_steps},
                          logging={"wandb": {"project": "alignflow-test", "name": "tiny", "mode": "offline"},
                                   "sample_every": 2})
        return Trainer(from_dict(raw)).fit()

    assert run(2)["step"] == 2
    assert run(4)["step"] == 4  # resumes from the step-2 checkpoint
    runs = sorted(glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*")))
    assert len(runs) == 2
    (first_id, config, first), (second_id, _, second) = read_run(runs[0]), read_run(runs[1])
    assert first_id == second_id  # the resumed run continues the same wandb run
    assert {"model", "transport", "logging"} <= config
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        metrics = {r["step"]: r for r in map(json.loads, f)}
    assert sorted(k for k, row in first.items() if "train/loss" in row) == [1, 2]
    assert sorted(k for k, row in second.items() if "train/loss" in row) == [3, 4]
    for step, row in {**first, **second}.items():
        if "train/loss" in row:
            assert row["train/loss"] == pytest.approx(metrics[step]["loss"], rel=1e-12)
            assert row["train/grad_norm"] == pytest.approx(metrics[step]["grad_norm"], rel=1e-12)
    grids = {step: row["samples/path"] for step, row in {**first, **second}.items() if "samples/path" in row}
    assert sorted(grids) == [2, 4]
    assert os.path.exists(os.path.join(runs[0], "files", grids[2]))


def test_wandb_configured_but_not_installed_is_named(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    cfg = from_dict(tiny_config(tmp_path / "run", tmp_path / "data", logging={"wandb": {}}))
    with pytest.raises(ConfigError, match=r"logging.wandb: .*pip install -e"):
        validate(cfg)
    validate(from_dict(tiny_config(tmp_path / "run", tmp_path / "data", logging={"wandb": {"mode": "disabled"}})))
