"""A derived spec follows the checkpoint's own config: optional parts (shared experts, dense first
layers, top-k renormalisation) switched off in config.json are off in the spec, and a spec that
does not describe a checkpoint's tensors is refused with the reason instead of being used.

Each checkpoint is written here from transformers' config class (tiny sizes) and a random model;
the independent reference is the model's own tensors and the config values that were written.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import CONFIG_MAPPING

from moe_utils.analysis.context import checkpoint_only
from moe_utils.analysis.static import weight_report
from moe_utils.arch.tiny import tiny_config_dict
from moe_utils.core.errors import CheckpointError
from moe_utils.models.loaded import LoadedModel
from moe_utils.models.random_models import build_model
from moe_utils.models.spec_match import spec_mismatch
from moe_utils.models.specs import get_spec, spec_for_config
from moe_utils.models.weights import layer_weights


def _write_checkpoint(folder: Path, model_type: str, **values) -> tuple[torch.nn.Module, object]:
    """A tiny random ``model_type`` checkpoint in ``folder`` whose config.json carries ``values``."""
    cls = CONFIG_MAPPING[model_type]
    config = cls(**{**tiny_config_dict(cls), **values})
    model = build_model(config)
    model.save_pretrained(folder)
    return model, config


def _same_weights(saved: LoadedModel, model: torch.nn.Module, config) -> None:
    """Every MoE layer streamed from the checkpoint equals the built model's own tensors."""
    built = LoadedModel(model, None, saved.spec, config, "built", None, "x")
    assert saved.moe_layers == built.moe_layers
    for layer in saved.moe_layers:
        a, b = layer_weights(saved, layer), layer_weights(built, layer)
        for name in ("router", "w_act", "w_up", "w_down", "shared_gate"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None), name
            if x is not None:
                torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_cohere2_moe_without_shared_experts_runs_observation_1_weights(tmp_path):
    model, config = _write_checkpoint(tmp_path, "cohere2_moe", num_shared_experts=0)
    lm = checkpoint_only(str(tmp_path))
    assert lm.spec.derived and lm.spec.memory.moe is not None
    assert lm.spec.memory.moe.shared is None
    assert all(f.moe is None or f.moe.shared is None for f in lm.spec.disk)
    _same_weights(lm, model, config)
    tables = weight_report(lm, reorder_max_pairs=0)
    assert set(tables["gate_correlation"]["layer"]) == set(lm.moe_layers)
    assert len(tables["similarity"]) > 0


def test_a_spec_expecting_shared_experts_is_refused_on_a_checkpoint_without_them(tmp_path):
    _write_checkpoint(tmp_path, "cohere2_moe", num_shared_experts=0)
    with_shared = get_spec("cohere2_moe")  # random:cohere2_moe has a shared expert
    assert with_shared.memory.moe is not None and with_shared.memory.moe.shared is not None
    cfg = checkpoint_only(str(tmp_path)).config
    with pytest.raises(CheckpointError, match="does not match the checkpoint's tensors"):
        LoadedModel(None, None, with_shared, cfg, "no-shared", tmp_path, "x")


def test_a_spec_without_shared_experts_is_refused_on_a_checkpoint_with_them(tmp_path):
    _write_checkpoint(tmp_path / "with", "cohere2_moe", num_shared_experts=1)
    _write_checkpoint(tmp_path / "without", "cohere2_moe", num_shared_experts=0)
    without = checkpoint_only(str(tmp_path / "without")).spec
    cfg = checkpoint_only(str(tmp_path / "with")).config
    lm_facts = LoadedModel(None, None, without, cfg, "probe", None, "x").facts
    why = spec_mismatch(without, lm_facts, tmp_path / "with")
    assert "shared" in why
    with pytest.raises(CheckpointError, match="shared"):
        LoadedModel(None, None, without, cfg, "with-shared", tmp_path / "with", "x")


# (family, config key, two values, what the spec shows for a value)
VARIANTS = [
    ("cohere2_moe", "num_shared_experts", (0, 1), lambda s: s.memory.moe.shared is not None),
    ("ernie4_5_moe", "moe_num_shared_experts", (0, 2), lambda s: s.memory.moe.shared is not None),
    ("glm4_moe", "n_shared_experts", (0, 1), lambda s: s.memory.moe.shared is not None),
    ("glm4_moe", "norm_topk_prob", (False, True), lambda s: s.routing.renormalize),
    ("glm4_moe", "first_k_dense_replace", (0, 1), lambda s: 0 not in s.defaults["_derived_moe_layers"]),
]


@pytest.mark.parametrize(("family", "key", "values", "shows"), VARIANTS, ids=[f"{v[0]}-{v[1]}" for v in VARIANTS])
def test_config_variants_derive_specs_that_match_their_checkpoints(tmp_path, family, key, values, shows):
    seen = []
    for value in values:
        folder = tmp_path / str(value)
        model, config = _write_checkpoint(folder, family, **{key: value})
        spec = spec_for_config(folder)
        lm = checkpoint_only(str(folder))
        assert lm.spec is spec
        assert spec_mismatch(spec, lm.facts, folder) == ""
        _same_weights(lm, model, config)
        seen.append(shows(spec))
    assert seen == [bool(v) for v in values]


def test_arch_lookups_are_hand_written_only_whatever_was_imported():
    """arch.get_spec / spec_for_config never derive (no import-time registration): a family
    without a hand-written spec is named with the function that derives it."""
    code = (
        "from moe_utils.arch import get_spec, spec_for_config\n"
        "import moe_utils.models.specs\n"
        "for call in (lambda: get_spec('glm4_moe'), lambda: spec_for_config({'model_type': 'glm4_moe'})):\n"
        "    try:\n"
        "        call()\n"
        "    except Exception as exc:\n"
        "        assert 'moe_utils.models.specs' in str(exc), exc\n"
        "    else:\n"
        "        raise AssertionError('derived')\n"
        "print(moe_utils.models.specs.get_spec('glm4_moe').derived)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "True"


def test_per_layer_head_counts_follow_the_tiny_depth():
    """A real config with one head count per layer (Laguna) and no dense layer shrinks to a tiny
    config the class accepts, so a spec can be derived for it (the coverage's all-sparse variant)."""
    from transformers import LagunaConfig

    from moe_utils.arch.tiny import tiny_config

    real = LagunaConfig().to_dict()
    n = real["num_hidden_layers"]
    real.update(num_attention_heads_per_layer=[32] * n, mlp_layer_types=["sparse"] * n)
    small = tiny_config(LagunaConfig, base=real)
    assert small.num_hidden_layers < n
    assert small.num_attention_heads_per_layer == [small.num_attention_heads] * small.num_hidden_layers
