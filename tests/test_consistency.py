"""config.json against the checkpoint's tensor shapes (moe_utils.models.consistency), on a tiny
checkpoint of every native MoE family: the true config passes, and a wrong expert count, expert
width or hidden size is named with its key and the tensor that disagrees."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
from tiny_models import NATIVE_MOE, save, tiny

from moe_utils.arch import spec_for_config
from moe_utils.arch.config import get_path, read_config_json
from moe_utils.models.checkpoint import find_weight_files
from moe_utils.models.consistency import ConfigMismatchError, check_config_against_tensors, header_tensors


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny checkpoint per native MoE family."""
    base = tmp_path_factory.mktemp("families")
    return {family: save(tiny(family), base / family) for family in NATIVE_MOE}


def _with(cfg: dict, key: str, value: int) -> dict:
    """A copy of ``cfg`` with the (possibly dotted) ``key`` set to ``value``."""
    out = copy.deepcopy(cfg)
    node = out
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return out


@pytest.mark.parametrize("family", NATIVE_MOE)
def test_true_config_passes_and_each_wrong_size_is_named(folders: dict[str, Path], family: str) -> None:
    folder = folders[family]
    cfg = read_config_json(folder)
    spec, files = spec_for_config(cfg), find_weight_files(folder)
    check_config_against_tensors(cfg, spec, files)
    shapes = {name: list(t.shape) for name, t in header_tensors(files).items()}
    for keys in (spec.keys.num_experts, spec.keys.expert_intermediate, spec.keys.hidden_size):
        key = next(k for k in keys if get_path(cfg, k, None) is not None)
        wrong = 2 * int(get_path(cfg, key)) + 2
        with pytest.raises(ConfigMismatchError) as info:
            check_config_against_tensors(_with(cfg, key, wrong), spec, files)
        message = str(info.value)
        assert "\n" not in message and f"{key}={wrong}" in message and "fix config.json" in message
        named = re.search(r" but (\S+) (?:has|names) ", message)
        assert named is not None
        tensor = named.group(1)
        if "*" not in tensor:  # a per-expert count names the pattern of the expert tensors
            assert str(shapes[tensor]) in message
