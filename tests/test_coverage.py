"""Derived family specs and the coverage matrix.

A sample of families runs in the default suite; ``MOE_BOOK_ALL_FAMILIES=1`` (``make
test-families``) checks every MoE family of the installed transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_utils.arch.catalogue import catalogue
from moe_utils.core.cpus import small_model_threads
from moe_utils.core.errors import UnknownFamilyError
from moe_utils.models.derive import DerivationError, derive_family, derive_spec
from moe_utils.models.loading import load_model
from moe_utils.models.specs import get_spec, spec_for_config
from moe_utils.models.trace import trace, verify_trace
from moe_utils.publish import coverage

# One derived family per quirk: sigmoid + correction bias + shared expert + dense layer
# (glm4_moe), hybrid linear attention + gated shared expert (qwen3_5_moe_text), softmax with a
# choice-only bias (ernie4_5_moe), routed/shared average (cohere2_moe), block-level bias
# (minimax_m2), group-limited routing (bailing_hybrid), Mamba hybrid with gate-less relu^2
# experts (nemotron_h), a multimodal model's text decoder (qwen3_vl_moe_text), fused experts
# under other names on disk (granitemoeshared), a shared expert whose gate projection is renamed
# by the original on-disk spelling only (hy_v4), a per-layer dense/sparse list (deepseek_ocr2_text).
SAMPLE = [
    "glm4_moe",
    "qwen3_5_moe_text",
    "ernie4_5_moe",
    "cohere2_moe",
    "minimax_m2",
    "bailing_hybrid",
    "nemotron_h",
    "qwen3_vl_moe_text",
    "granitemoeshared",
    "hy_v4",
    "deepseek_ocr2_text",
]
ALL = [e.model_type for e in catalogue() if not e.excluded]
FAMILIES = ALL if os.environ.get("MOE_BOOK_ALL_FAMILIES") else SAMPLE
REPO = Path(__file__).resolve().parents[1]


def test_catalogue_is_read_from_transformers():
    names = {e.model_type for e in catalogue()}
    assert len(names) >= 60
    assert {
        "glm4_moe",
        "minimax_m2",
        "ernie4_5_moe",
        "dots1",
        "kimi_linear",
        "longcat_flash",
        "exaone_moe",
        "cohere2_moe",
        "mimo_v2_flash",
        "solar_open",
        "qwen3_5_moe_text",
        "deepseek_v32",
        "deepseek_v4",
        "mistral4",
    } <= names
    for entry in catalogue():
        if entry.excluded:
            assert "not a decoder language model" in entry.excluded or "config" in entry.excluded
    assert next(e for e in catalogue() if e.package == "qwen3_vl_moe").model_type == "qwen3_vl_moe_text"


@pytest.mark.parametrize("family", FAMILIES)
def test_family_rebuilds_every_moe_block(family, tmp_path):
    """The spec (hand-written or derived) rebuilds the model's own block outputs, and both
    on-disk spellings stream the weights the model holds."""
    entry = next(e for e in catalogue() if e.model_type == family)
    row = coverage.FamilyRow(family, entry.package, entry.config_class)
    coverage.trace_check(row, coverage.random_name(entry))
    if family in SAMPLE or row.spec != "none":
        assert row.trace_ok, row.reason
        assert row.rebuild_error <= 1e-5
        assert row.disk_ok, row.reason
    else:  # a family the engine refuses must say why
        assert row.reason


def test_derived_glm4_moe_matches_config_and_model():
    spec = get_spec("glm4_moe")
    assert spec.derived and spec.routing.method == "sigmoid_topk"
    assert spec.memory.moe.correction_bias == "mlp.gate.e_score_correction_bias"
    assert spec.memory.moe.shared is not None
    lm = load_model("random:glm4_moe")
    cfg = lm.config
    # layer pattern: closed form of the config (first_k_dense_replace dense layers first)
    assert lm.moe_layers == list(range(cfg.first_k_dense_replace, cfg.num_hidden_layers))
    assert spec.routing.renormalize == bool(cfg.norm_topk_prob)
    assert spec.routing.scale == pytest.approx(cfg.routed_scaling_factor)
    # router logits: transformers' own output_router_logits
    ids = [[0, 5, 9, 77, 31, 200, 4]]
    tr = trace(lm, ids)
    with torch.no_grad(), small_model_threads(lm.facts.hidden_size):  # the thread count the trace ran with
        out = lm.model(torch.tensor(ids), output_router_logits=True, use_cache=False)
    for layer, logits in zip(lm.moe_layers, out.router_logits):
        assert torch.equal(tr[layer].router_logits, logits.float().reshape(-1, logits.shape[-1]))
    for check in verify_trace(lm, tr):
        assert check.indices_equal and check.max_rel_error <= 1e-5 and check.max_weight_error <= 1e-5


def test_real_config_layer_pattern_comes_from_the_skeleton():
    from transformers import Glm4MoeConfig

    cfg = Glm4MoeConfig(
        num_hidden_layers=7,
        first_k_dense_replace=3,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=16,
        n_routed_experts=16,
        num_experts_per_tok=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=320,
        n_group=4,
        topk_group=2,
    ).to_dict()
    spec = spec_for_config(cfg)
    assert spec.derived
    assert spec.moe_layers(cfg) == [3, 4, 5, 6]
    assert spec.num_experts(cfg) == 16 and spec.top_k(cfg) == 4
    from moe_utils.engine.routing import route_params

    params = route_params(spec, cfg)
    assert (params.n_group, params.topk_group) == (4, 2)


def test_config_overrides_rederive_the_layer_pattern():
    lm = load_model("random:glm4_moe", config_overrides={"num_hidden_layers": 3})
    assert lm.moe_layers == [1, 2]


def test_refusals_say_what_did_not_match():
    with pytest.raises(DerivationError, match="norm"):
        derive_family("muse_spark_text")
    with pytest.raises(UnknownFamilyError, match="text decoder.*qwen3_vl_moe_text"):
        spec_for_config({"model_type": "qwen3_vl_moe"})
    with pytest.raises(UnknownFamilyError, match="not a decoder language model"):
        get_spec("switch_transformers")
    with pytest.raises(UnknownFamilyError, match="experts module"):
        derive_spec(
            {
                "model_type": "mistral",
                "num_hidden_layers": 2,
                "hidden_size": 32,
                "intermediate_size": 48,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 320,
            }
        )


def test_quirks_are_stated():
    quirks = " ".join(get_spec("qwen3_5_moe_text").quirks)
    assert "hybrid stack" in quirks and "linear_attention" in quirks
    quirks = " ".join(get_spec("glm4_moe").quirks)
    assert "bias" in quirks and "sigmoid" in quirks
    quirks = " ".join(get_spec("cohere2_moe").quirks)
    assert "0.5" in quirks


def test_committed_coverage_matrix_and_page():
    data = json.loads((REPO / coverage.DATA_FILE).read_text())
    counts = coverage.summary_counts(data)
    assert counts["listed"] >= 45
    assert counts["pass"] >= 40
    assert data["notebooks"] is True and data["transformers"]
    for row in data["rows"]:
        r = coverage.FamilyRow(**row)
        if not r.passes:
            assert r.reason, f"{r.family} fails without a reason"
        if r.passes:
            assert r.rebuild_error <= 1e-5
    assert (REPO / coverage.PAGE_FILE).read_text() == coverage.render_page(data)
    assert "book/coverage" in (REPO / "_toc.yml").read_text()


def test_render_page_lists_every_row():
    data = {
        "transformers": "x",
        "torch": "y",
        "date": "2026-01-01",
        "notebooks": True,
        "tolerance": 1e-5,
        "rows": [
            vars(
                coverage.FamilyRow(
                    "a",
                    "a",
                    "AConfig",
                    spec="derived",
                    trace_ok=True,
                    rebuild_error=1e-7,
                    disk_ok=True,
                    weights_ok=True,
                    dynamic_ok=True,
                    routing="softmax",
                )
            ),
            vars(coverage.FamilyRow("b", "b", "BConfig", reason="refused: zero experts")),
        ],
    }
    page = coverage.render_page(data)
    assert "| `a` |" in page and "| `b` |" in page and "refused: zero experts" in page
    assert "2 families are listed; 1 pass both analyses" in page


@pytest.mark.slow
def test_never_seen_family_runs_every_notebook(tmp_path):
    """A family with no hand-written spec, built from its transformers config class, runs
    through every per-model notebook with moe-book run."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_utils.publish.cli",
            "run",
            "--model",
            "random:glm4_moe",
            "--out",
            str(tmp_path),
            "--notebooks-dir",
            str(REPO / "notebooks"),
            "-p",
            "max_tokens",
            "512",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = sorted(p.stem for p in (tmp_path / "random-glm4_moe").glob("*.ipynb"))
    assert {"obs1_neurons_as_experts", "obs2_router_norms", "obs3_depth_diversity"} <= set(written)


def _variants(family: str) -> list[tuple[str, str, dict]]:
    from moe_utils.arch.optional_parts import config_variants
    from moe_utils.models.random_models import random_config

    return [(family, part, v) for part, v in config_variants(random_config(get_spec(family)).to_dict())]


VARIANT_CASES = [
    case for family in ("cohere2_moe", "ernie4_5_moe", "glm4_moe", "qwen3_moe", "dots1") for case in _variants(family)
]


@pytest.mark.parametrize(
    ("family", "part", "overrides"),
    VARIANT_CASES,
    ids=[f"{f}:{coverage.variant_label(p, v)}" for f, p, v in VARIANT_CASES],
)
def test_config_variants_get_their_own_passing_spec(family, part, overrides):
    """A variant switching an optional part gets a spec derived from its own config, which
    rebuilds its MoE blocks and streams both spellings of its saved checkpoint, and the spec
    says what the variant changed."""
    assert coverage.variant_check(family, overrides) == ""
    lm = load_model(f"random:{family}", config_overrides=overrides)
    moe = lm.spec.memory.moe
    assert moe is not None
    ((key, value),) = overrides.items()
    if part == "shared experts":
        assert (moe.shared is None) == (value == 0)
    if part == "dense layers":
        n = lm.config.num_hidden_layers
        base = load_model(f"random:{family}")
        assert lm.moe_layers != base.moe_layers
        assert set(lm.moe_layers) <= set(range(n))


def test_every_sampled_family_with_optional_parts_has_a_variant_per_part():
    parts = {f: {p for _, p, _ in _variants(f)} for f in ("glm4_moe", "cohere2_moe", "qwen3_moe", "mixtral")}
    assert parts["glm4_moe"] == {"shared experts", "dense layers", "top-k renormalisation"}
    assert parts["cohere2_moe"] == {"shared experts", "dense layers", "top-k renormalisation"}
    assert parts["qwen3_moe"] == {"dense layers", "top-k renormalisation"}
    assert parts["mixtral"] == set()


def test_trace_only_refresh_keeps_the_notebook_columns():
    old_row = vars(
        coverage.FamilyRow(
            "a",
            "a",
            "AConfig",
            trace_ok=True,
            rebuild_error=0.0,
            weights_ok=True,
            dynamic_ok=False,
            reason="dynamic notebooks: boom",
        )
    )
    head = {"transformers": "x", "torch": "y", "tolerance": 1e-5}
    old = {**head, "date": "2026-01-01", "notebooks": True, "max_tokens": 512, "rows": [old_row]}
    fresh = vars(coverage.FamilyRow("a", "a", "AConfig", trace_ok=True, rebuild_error=0.0, variants={"x: k=0": ""}))
    merged = coverage.merge(old, {"date": "2026-02-02", "notebooks": False, "rows": [fresh]})
    (row,) = merged["rows"]
    assert row["weights_ok"] is True and row["dynamic_ok"] is False
    assert row["reason"] == "dynamic notebooks: boom" and row["variants"] == {"x: k=0": ""}
    assert row["notebooks_date"] == "2026-01-01" and merged["date"] == "2026-02-02" and merged["notebooks"]
    assert "the notebook columns come from runs on 2026-01-01" in coverage.render_page(merged)
    newer = {**fresh, "family": "b", "weights_ok": True, "dynamic_ok": True, "notebooks_date": "2026-02-02"}
    both = coverage.merge(merged, {**head, "date": "2026-02-02", "notebooks": True, "rows": [newer]})
    assert [r["notebooks_date"] for r in both["rows"]] == ["2026-01-01", "2026-02-02"]
    assert "come from runs between 2026-01-01 and 2026-02-02" in coverage.render_page(both)
    assert "checks ran between 2026-01-01 and 2026-02-02" not in coverage.render_page(merged)
    other = {**old_row, "family": "c"}
    partial = coverage.merge(
        {**old, "rows": [old_row, other]}, {"date": "2026-02-02", "notebooks": False, "rows": [fresh]}
    )
    assert {r["family"]: r["checks_date"] for r in partial["rows"]} == {"a": "2026-02-02", "c": "2026-01-01"}
    assert "checks ran between 2026-01-01 and 2026-02-02" in coverage.render_page(partial)
    broken = vars(coverage.FamilyRow("a", "a", "AConfig", reason="no longer rebuilds"))
    (row,) = coverage.merge(old, {"date": "2026-02-02", "notebooks": False, "rows": [broken]})["rows"]
    assert row["weights_ok"] is None and row["reason"] == "no longer rebuilds"
