"""The observation pages' opening boxes say different things for different numbers."""

from __future__ import annotations

from moe_utils.analysis import interpretation as I


def _entry(value, verdict, **kw):
    return {"value": value, "ci_low": value - 0.01, "ci_high": value + 0.01, "verdict": verdict, **kw}


def test_obs1_box_follows_the_effect_and_the_weights():
    strong = {
        "router_act_alignment": _entry(0.3, "holds", observed=0.28, null=-0.02, power=0.99),
        "matrix_similarity_experts": {"value": 0.9},
    }
    none = {
        "router_act_alignment": _entry(-0.05, "inconclusive", observed=-0.08, null=-0.03, power=0.4),
        "matrix_similarity_experts": {"value": 0.01},
    }
    a, b = I.obs1_box(strong, "m"), I.obs1_box(none, "m")
    assert "tracks W_act similarity more" in a and "at least as large as on the paper's" in a
    assert "close copies" in a and "nearly unrelated" in b
    assert "no more" in b and "absent" in b and "only 40% of the time" in b
    assert "no gate projection" in I.obs1_box({}, "m")


def test_obs2_box_names_the_null_and_the_activation_regime():
    s = {
        "norm_preference": _entry(0.12, "detectable but below the floor", observed=0.21, null=0.09),
        "top1_norm_agreement": {"value": 0.21, "baseline": 0.125},
        "activation_ratio": {"value": 0.3},
    }
    text = I.obs2_box(s, "m")
    assert "21%" in text and "9%" in text and "2.3 times" in text
    assert "not 1/E" in text and "GELU" in text and "detectable but below the floor" in text


def test_obs3_box_states_both_forms_and_the_input_null():
    s = {
        "depth_pattern_weak": _entry(0.03, "holds", note="... rise beyond the input geometry: yes; ..."),
        "last_layer_as_early": _entry(-0.02, "does not hold"),
        "depth_slope": _entry(-0.05, "holds"),
        "last_layer_residual": _entry(0.03, "holds"),
    }
    text = I.obs3_box(s, "m")
    assert "less alike with depth" in text and "+0.030 above" in text
    assert "weak form" in text and "strong form" in text and "belongs to the trained experts" in text
    s["depth_pattern_weak"]["note"] = "... rise beyond the input geometry: no; ..."
    assert "may come from the inputs" in I.obs3_box(s, "m")


def test_organisms_load_reading_names_dead_and_busiest_experts():
    import pandas as pd

    from moe_utils.zoo import report

    df = pd.DataFrame(
        {
            "model": ["a"] * 4 + ["b"] * 4,
            "layer": [0, 0, 1, 1] * 2,
            "expert": [0, 1, 0, 1] * 2,
            "selections": [0, 10, 5, 5, 3, 7, 9, 1],
            "share": [0.0, 1.0, 0.5, 0.5, 0.3, 0.7, 0.9, 0.1],
            "uniform": [0.5] * 8,
        }
    )
    text = report.load_interpretation(df)
    assert "**a** has 1 dead expert(s) (layer 0 expert 0)" in text
    assert "**b** has no dead expert; its busiest expert (layer 1, expert 0) takes 90%" in text
