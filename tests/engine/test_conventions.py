"""The README's "Coming from REPA / REG / SiT" where it is code: its table of REPA train.py flags is
engine.models.pretrained.REPA_FLAGS and every key it names exists in the experiment config; the null
class follows num_classes (REPA's samplers hard-code 1000)."""
import dataclasses
import os
import re
import typing

import torch

from engine.config import ExperimentConfig
from engine.models.pretrained import REPA_FLAGS
from tests.engine.common import tiny_model

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def config_key_exists(path: str) -> bool:
    cls = ExperimentConfig
    for part in path.split("."):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return False
        hint = typing.get_type_hints(cls)[part]
        args = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        cls = hint if dataclasses.is_dataclass(hint) else (args[0] if args else None)
    return True


def test_readme_flag_table_is_the_code_mapping_and_names_real_keys():
    with open(README) as f:
        rows = re.findall(r"^\| `(--[a-z0-9-]+)` \| (`[a-z0-9_.]+`|none) \|$", f.read(), flags=re.M)
    table = {flag: None if target == "none" else target.strip("`") for flag, target in rows}
    assert table == REPA_FLAGS
    missing = [key for key in REPA_FLAGS.values() if key is not None and not config_key_exists(key)]
    assert not missing


def test_null_class_is_num_classes():
    model = tiny_model(num_classes=7)
    assert model.null_class == 7 and model.y_embedder.embedding_table.weight.shape[0] == 8
    dropped = model.drop_labels(torch.zeros(4096, dtype=torch.long))
    assert set(dropped.unique().tolist()) == {0, 7}
