"""engine.parts, the resumable directory of per-batch parts behind engine.sample and engine.evaluate:
what each stale policy does with parts made with other settings, and which parts a rerun remakes."""
import json
import os

import numpy as np
import pytest
import torch

from engine.distributed import DistInfo
from engine.parts import open_parts, part_path, parts_to_make, read_parts, stale_reason, write_part

ONE_RANK = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
META = {"seed": 0, "num_steps": 2, "guidance_high": 0.7}


def rows_problem(part, batch):
    return None if len(part["x"]) == batch + 1 else f"holds {len(part['x'])} rows"


def made(tmp_path, meta=META, batches=3):
    parts_dir = str(tmp_path / "parts")
    open_parts(parts_dir, meta, stale="refuse")
    arrays = [np.random.default_rng().standard_normal((b + 1, 4)) for b in range(batches)]
    for b, x in enumerate(arrays):
        write_part(parts_dir, b, x=x)
    return parts_dir, arrays


def test_rerun_remakes_only_missing_and_wrong_parts(tmp_path):
    parts_dir, arrays = made(tmp_path, batches=5)
    os.remove(part_path(parts_dir, 1))
    with open(part_path(parts_dir, 2), "r+b") as f:  # a write cut short
        f.truncate(os.path.getsize(part_path(parts_dir, 2)) // 2)
    write_part(parts_dir, 3, x=np.zeros((1, 4)))  # the wrong number of rows
    open(os.path.join(parts_dir, "batch_000004.npz.tmp-123"), "wb").close()  # left by a killed writer
    open_parts(parts_dir, META, stale="refuse")
    assert not any(".tmp-" in name for name in os.listdir(parts_dir))
    todo = parts_to_make(ONE_RANK, parts_dir, 5, rows_problem)
    assert (todo.missing, todo.corrupt, todo.mine) == ([1, 2, 3], [2, 3], [1, 2, 3])
    for b in todo.mine:
        write_part(parts_dir, b, x=arrays[b])
    assert parts_to_make(ONE_RANK, parts_dir, 5, rows_problem).missing == []
    for x, part in zip(arrays, read_parts(parts_dir, 5, ("x",))):
        np.testing.assert_array_equal(part["x"], x)


def test_refuse_names_the_differing_settings_and_keeps_the_parts(tmp_path):
    parts_dir, arrays = made(tmp_path)
    with pytest.raises(ValueError, match=r"num_steps: 2 there, 3 now") as error:
        open_parts(parts_dir, {**META, "num_steps": 3}, stale="refuse")
    assert "--overwrite" in str(error.value) and "seed" not in str(error.value) and "\n" not in str(error.value)
    np.testing.assert_array_equal(next(read_parts(parts_dir, 1, ("x",)))["x"], arrays[0])
    # a setting the parts' meta.json predates counts as its default
    meta_path = os.path.join(parts_dir, "meta.json")
    with open(meta_path, "w") as f:
        json.dump({"seed": 0, "num_steps": 2}, f)
    assert stale_reason(parts_dir, META, defaults={"guidance_high": 0.7}) is None
    assert "guidance_high: 1.0 there, 0.7 now" in stale_reason(parts_dir, META, defaults={"guidance_high": 1.0})
    with open(meta_path, "w") as f:
        f.write("[1, 2")
    with pytest.raises(ValueError, match="meta.json is unreadable"):
        open_parts(parts_dir, META, stale="refuse")
    os.remove(meta_path)
    with pytest.raises(ValueError, match="holds parts but no meta.json"):
        open_parts(parts_dir, META, stale="refuse")
    open_parts(parts_dir, {**META, "num_steps": 3}, stale="refuse", overwrite=True)
    assert os.listdir(parts_dir) == ["meta.json"]
    with open(meta_path) as f:
        assert json.load(f) == {**META, "num_steps": 3}


def test_delete_replaces_stale_parts_and_keeps_matching_ones(tmp_path):
    parts_dir, arrays = made(tmp_path)
    open_parts(parts_dir, META, stale="delete")
    assert parts_to_make(ONE_RANK, parts_dir, 3, rows_problem).missing == []
    open_parts(parts_dir, {**META, "seed": 1}, stale="delete")
    assert os.listdir(parts_dir) == ["meta.json"]
    assert parts_to_make(ONE_RANK, parts_dir, 3, rows_problem).missing == [0, 1, 2]
    with pytest.raises(ValueError, match=r"stale='keep'; allowed: refuse, delete"):
        open_parts(parts_dir, META, stale="keep")
    with open(tmp_path / "a_file", "w"):
        pass
    with pytest.raises(ValueError, match="a_file is a file"):
        open_parts(str(tmp_path / "a_file"), META, stale="delete")
