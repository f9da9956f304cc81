"""The ladder's plain words against planted tables whose answers are known by construction."""

from __future__ import annotations

import pandas as pd

from moe_utils.analysis.claims import CLAIMS
from moe_utils.zoo import ladder_words as W


def _combined(rows: list[tuple[str, int, float, float, float, str]], seeds: int = 3) -> pd.DataFrame:
    """``ladder_across_seeds`` rows of the scratch kind: (claim, layers, effect, low, high, outcome)."""
    return pd.DataFrame(
        [
            {
                "kind": "scratch",
                "layers": layers,
                "steps": 1200,
                "claim": claim,
                "seeds": seeds,
                "effect": eff,
                "ci_low": lo,
                "ci_high": hi,
                "floor": CLAIMS[claim].floor,
                "outcome": outcome,
            }
            for claim, layers, eff, lo, hi, outcome in rows
        ]
    )


PLANTED = _combined(
    [
        # rises at every step and the deepest interval excludes the shallowest estimate: strengthens
        ("obs1", 4, 0.00, -0.10, 0.10, "inconclusive"),
        ("obs1", 8, 0.10, 0.00, 0.20, "inconclusive"),
        ("obs1", 16, 0.20, 0.12, 0.28, "holds"),
        # falls at every step, deepest interval below the shallowest estimate: weakens
        ("obs2", 4, 0.30, 0.25, 0.35, "holds"),
        ("obs2", 8, 0.20, 0.15, 0.25, "holds"),
        ("obs2", 16, 0.10, 0.05, 0.15, "inconclusive"),
        # the same decided outcome at every depth, not monotone: settled, no trend
        ("obs3_weak", 4, 0.04, 0.02, 0.06, "holds"),
        ("obs3_weak", 8, 0.03, 0.02, 0.04, "holds"),
        ("obs3_weak", 16, 0.05, 0.03, 0.07, "holds"),
        # falls at every step but the deepest interval still covers the shallowest estimate: no trend
        ("obs3_strong", 4, -0.01, -0.05, 0.03, "inconclusive"),
        ("obs3_strong", 8, -0.02, -0.06, 0.02, "inconclusive"),
        ("obs3_strong", 16, -0.03, -0.08, 0.02, "inconclusive"),
    ]
)


def _line(text: str, key: str) -> str:
    title = CLAIMS[key].title
    return next(line for line in text.splitlines() if line.startswith(f"- {title[:1].upper()}{title[1:]}"))


def test_depth_trends_follow_the_stated_rule():
    trend = {k: W.depth_trend(PLANTED[PLANTED.claim == k].sort_values(by="layers"), k) for k in W.DEPTH_CLAIMS}
    assert trend == {"obs1": "strengthens", "obs2": "weakens", "obs3_weak": "no trend", "obs3_strong": "no trend"}


def test_a_claim_against_the_papers_direction_strengthens_when_it_falls():
    """obs3_slope's paper direction is negative: a slope falling further below zero strengthens it."""
    rows = _combined(
        [("obs3_slope", 4, -0.02, -0.03, -0.01, "holds"), ("obs3_slope", 16, -0.08, -0.09, -0.07, "holds")]
    )
    assert W.depth_trend(rows, "obs3_slope") == "strengthens"


def test_depth_words_say_what_is_settled_and_what_moves():
    text = W.depth_words(PLANTED, steps=1200)
    assert "settled at this scale: holds at every depth" in _line(text, "obs3_weak")
    assert "strengthens with depth" in _line(text, "obs1") and "not settled" in _line(text, "obs1")
    assert "weakens with depth" in _line(text, "obs2") and "inconclusive at 16 layers" in _line(text, "obs2")
    assert "cannot tell a trend" in _line(text, "obs3_strong")
    assert f"Settled at this scale: {CLAIMS['obs3_weak'].title}." in text
    assert "16 layers holds +0.200 [+0.120, +0.280] (3 seeds)" in _line(text, "obs1")


def test_depth_words_need_two_seeded_depths():
    one_seed_deep = pd.concat(
        [PLANTED[PLANTED.layers == 8], _combined([("obs1", 16, 0.2, 0.1, 0.3, "holds")], seeds=1)]
    )
    assert "fewer than two depths" in W.depth_words(one_seed_deep)


def _trajectory(rep: str, kind: str, quantity: str, values: dict[int, float]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "replicate": rep,
                "ladder": "length",
                "kind": kind,
                "step": s,
                "quantity": quantity,
                "value": v,
                "ci_low": v - 0.05,
                "ci_high": v + 0.05,
            }
            for s, v in values.items()
        ]
    )


def test_length_words_tell_stopped_from_drifting_and_the_similarity_rate():
    steps = (0, 300, 600, 1200, 2400, 4800)
    t = pd.concat(
        [
            # obs1 moves by 0.01 < its floor over the last doubling; obs2 by 0.20 > its floor
            _trajectory(
                "scratch-long-s0", "scratch", CLAIMS["obs1"].quantity, dict(zip(steps, [0, 0.1, 0.2, 0.3, 0.30, 0.31]))
            ),
            _trajectory(
                "scratch-long-s0", "scratch", CLAIMS["obs2"].quantity, dict(zip(steps, [0, 0.1, 0.2, 0.3, 0.40, 0.20]))
            ),
            _trajectory(
                "upcycled-long-s0",
                "upcycled",
                "expert_matrix_similarity",
                dict(zip(steps, [0.99, 0.9, 0.8, 0.6, 0.5, 0.35])),
            ),
            _trajectory("scratch-s1", "scratch", CLAIMS["obs1"].quantity, {0: 0.0, 1200: 0.5}).assign(ladder=None),
        ]
    )
    text = W.length_words(t)
    scratch = next(line for line in text.splitlines() if "scratch-long-s0" in line)
    assert "obs1 has stopped moving (+0.300 at step 2400, +0.310 at step 4800: a change of +0.010" in scratch
    assert "obs2 still drifts" in scratch and "a change of -0.200" in scratch
    upcycled = next(line for line in text.splitlines() if "upcycled-long-s0" in line)
    # (0.35 - 0.9) over log2(4800 / 300) = 4 doublings
    assert "from 0.990 (step 0) to 0.350 (step 4800), -0.138 per doubling of steps, inside" in upcycled
    assert "scratch-s1" not in text


def test_length_words_without_a_long_run():
    assert "no 4x run" in W.length_words(pd.DataFrame(columns=["replicate", "step", "quantity", "value"]))


def test_the_long_stream_is_described_from_its_manifest():
    from moe_utils.zoo.long_corpus import describe_long_stream

    meta = {
        "base_tokens": 1000,
        "tokens": 4003,
        "reached_target": True,
        "added": {"stdlib": {"documents": 3, "tokens": 1500}, "numpy": {"documents": 2, "tokens": 1503}},
        "package_versions": {"numpy": "2.0"},
        "sha256": "ab" * 32,
    }
    text = describe_long_stream(meta)
    assert text.startswith("The 4x runs' training stream holds 4,003 tokens: the organisms' 1,000, then ")
    assert "3 standard-library source files the organisms' sample left out, 1,500 tokens" in text
    assert "2 files of numpy 2.0 (docstrings and sources), 1,503 tokens" in text
    short = describe_long_stream({**meta, "reached_target": False})
    assert "ran out before the target" in short


def test_the_shipped_long_stream_manifest_adds_up():
    """The manifest shipped with the 4x runs' results: the organisms' stream plus what was added is
    the whole stream, which reaches its target of 4x the organisms' stream."""
    import json

    from moe_utils.core.paths import ZOO_STUDY_DIR
    from moe_utils.zoo.long_corpus import LONG_CORPUS_FILE

    meta = json.loads((ZOO_STUDY_DIR / LONG_CORPUS_FILE).read_text())
    assert meta["tokens"] == meta["base_tokens"] + sum(e["tokens"] for e in meta["added"].values())
    assert meta["reached_target"] and meta["tokens"] >= meta["factor"] * meta["base_tokens"]
