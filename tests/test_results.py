"""Results files: round trip, schema validation, atomic writes and discovery."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from moe_utils.analysis import results as R
from moe_utils.core.errors import ResultsFileError


def sample_tables():
    return {
        "per_layer": pd.DataFrame({"layer": [0, 1, 2], "value": [0.5, np.nan, 0.25], "kind": ["a", "b", "c"]}),
        "counts": pd.DataFrame({"score_rank": np.array([1, 2], dtype=np.int64), "count": np.array([3, 4])}),
    }


def sample_summary():
    return {
        "agreement": R.summary_entry(
            np.float64(0.6),
            0.5,
            0.7,
            baseline=0.125,
            verdict="holds",
            paper={"Mixtral 8x7B": 0.69},
            note="cluster bootstrap",
        ),
        "n_tokens": 120,
        "partial": {"value": float("nan"), "verdict": "inconclusive"},
    }


def write_sample(tmp_path, params=None, analysis="obs_x"):
    return R.write_result(
        tmp_path,
        analysis,
        "zoo:tiny",
        "fp1",
        params or {"layers": (1, 2), "seed": np.int64(0)},
        sample_tables(),
        sample_summary(),
    )


def test_round_trip(tmp_path):
    path = write_sample(tmp_path)
    assert path == tmp_path / "obs_x.json"
    res = R.read_result(tmp_path, "obs_x")
    assert (res.analysis, res.model, res.fingerprint) == ("obs_x", "zoo:tiny", "fp1")
    assert res.params == {"layers": [1, 2], "seed": 0}
    pd.testing.assert_frame_equal(res.tables["per_layer"], sample_tables()["per_layer"])
    assert res.tables["counts"]["count"].tolist() == [3, 4]
    assert res.summary["agreement"]["value"] == 0.6 and res.summary["agreement"]["paper"] == {"Mixtral 8x7B": 0.69}
    assert res.summary["n_tokens"] == {
        "value": 120,
        "ci_low": None,
        "ci_high": None,
        "baseline": None,
        "verdict": None,
        "paper": {},
        "note": "",
    }
    assert res.summary["partial"]["value"] is None  # NaN stored as null
    assert res.value("agreement") == 0.6
    assert R.read_result(path).analysis == "obs_x"
    doc = json.loads(path.read_text())
    assert next(iter(doc)) == "schema" and doc["schema"] == R.SCHEMA
    assert set(doc) == set(R._TOP_FIELDS) | set(R._OPTIONAL_FIELDS)
    assert doc["invalid"] == [] and not res.is_invalid


def test_indexed_frame_keeps_its_index(tmp_path):
    df = pd.DataFrame({"v": [1.0, 2.0]}, index=pd.Index([3, 4], name="layer"))
    R.write_result(tmp_path, "idx", "m", "f", {}, {"t": df}, {})
    assert R.read_result(tmp_path, "idx").tables["t"].columns.tolist() == ["layer", "v"]


def test_invalid_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="verdict"):
        R.write_result(tmp_path, "a", "m", "f", {}, {}, {"k": {"value": 1, "verdict": "maybe"}})
    with pytest.raises(ValueError, match="analysis name"):
        R.write_result(tmp_path, "../evil", "m", "f", {}, {}, {})
    with pytest.raises(TypeError):
        R.write_result(tmp_path, "a", "m", "f", {"x": object()}, {}, {})
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob(".*"))


def test_crash_mid_write_leaves_old_file_valid(tmp_path, monkeypatch):
    write_sample(tmp_path)

    def crash(fd):
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk vanished"):
        R.write_result(tmp_path, "obs_x", "zoo:other", "fp2", {}, {}, {})
    monkeypatch.undo()
    assert R.read_result(tmp_path, "obs_x").model == "zoo:tiny"
    assert [p.name for p in tmp_path.iterdir()] == ["obs_x.json"]  # no temp file left behind


def test_crash_before_rename_leaves_old_file(tmp_path, monkeypatch):
    write_sample(tmp_path)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        R.write_result(tmp_path, "obs_x", "zoo:other", "fp2", {}, {}, {})
    monkeypatch.undo()
    assert R.read_result(tmp_path, "obs_x").fingerprint == "fp1"
    assert len(list(tmp_path.iterdir())) == 1


def test_truncated_and_wrong_files_raise_clear_errors(tmp_path):
    path = write_sample(tmp_path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ResultsFileError, match="truncated.*delete it and rerun"):
        R.read_result(path)
    path.write_text(json.dumps({"schema": "moe-book-results/0"}))
    with pytest.raises(ResultsFileError, match="schema"):
        R.read_result(path)
    doc = json.loads(text)
    del doc["summary"]["agreement"]["ci_low"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ResultsFileError, match="agreement"):
        R.read_result(path)
    with pytest.raises(ResultsFileError, match="no results file"):
        R.read_result(tmp_path, "missing")


def test_find_results_lists_valid_and_broken_files(tmp_path):
    write_sample(tmp_path / "m1" / "results")
    write_sample(tmp_path / "m2" / "results", analysis="obs_y")
    broken = tmp_path / "m2" / "results" / "obs_z.json"
    text = (tmp_path / "m1" / "results" / "obs_x.json").read_text()
    broken.write_text(text[:300])
    (tmp_path / "other.json").write_text('{"not": "a results file"}')
    df = R.find_results(tmp_path)
    assert len(df) == 3
    assert df["valid"].tolist().count(False) == 1
    bad = df[~df.valid].iloc[0]
    assert bad.path.endswith("obs_z.json") and "not a valid results file" in bad.error
    assert set(df[df.valid].analysis) == {"obs_x", "obs_y"}
    rows = R.summary_rows(tmp_path)
    assert len(rows) == 2 * 3 and set(rows.key) == {"agreement", "n_tokens", "partial"}


def test_iter_results_reads_one_pattern_and_raises_on_a_broken_file(tmp_path):
    write_sample(tmp_path / "m1" / "results")
    write_sample(tmp_path / "m2" / "results", analysis="obs_y")
    write_sample(tmp_path / "m2" / "results" / "deeper")  # not matched by the pattern
    (tmp_path / "m1" / "results" / "notes.json").write_text('{"not": "a results file"}')
    (tmp_path / "m1" / "results" / ".obs_x.json.tmp.json").write_text("{")  # a temporary
    found = list(R.iter_results(tmp_path, "*/results/*.json"))
    assert [(r.model, r.analysis, r.path.parent.parent.name) for r in found] == [
        ("zoo:tiny", "obs_x", "m1"),
        ("zoo:tiny", "obs_y", "m2"),
    ]
    assert found[0].tables["per_layer"].equals(R.read_result(found[0].path).tables["per_layer"])
    assert [r.analysis for r in R.iter_results(tmp_path, "*/results/obs_y.json")] == ["obs_y"]
    assert len(list(R.iter_results(tmp_path))) == 3  # default: every folder below
    text = (tmp_path / "m1" / "results" / "obs_x.json").read_text()
    (tmp_path / "m2" / "results" / "obs_z.json").write_text(text[:300])
    with pytest.raises(ResultsFileError, match="obs_z.json"):
        list(R.iter_results(tmp_path, "*/results/*.json"))


def test_summary_frame():
    res = R.Result("a", "m", "f", {}, "t", "0", {}, {"k": R.summary_entry(1.0, verdict="holds")})
    assert res.summary_frame().loc[0, "verdict"] == "holds"


def test_a_wrong_field_is_named_with_the_file_on_one_line(tmp_path):
    path = write_sample(tmp_path)
    original = path.read_text()
    for change, field in (
        (lambda d: d["summary"]["agreement"].update(ci_low="0.5"), "summary.agreement.ci_low"),
        (lambda d: d["summary"]["agreement"].update(verdict="maybe"), "summary.agreement.verdict"),
        (lambda d: d.update(model=3), "field model"),
        (lambda d: d["tables"].update(per_layer={"layer": 0}), "tables.per_layer"),
        (lambda d: d.update(extra_field=1), "extra_field"),
    ):
        doc = json.loads(original)
        change(doc)
        path.write_text(json.dumps(doc))
        with pytest.raises(ResultsFileError) as info:
            R.read_result(path)
        message = str(info.value)
        assert "\n" not in message and str(path) in message and field in message


def test_files_written_before_the_optional_fields_still_load(tmp_path):
    path = write_sample(tmp_path)
    doc = json.loads(path.read_text())
    for field in R._OPTIONAL_FIELDS:
        del doc[field]
    path.write_text(json.dumps(doc))
    res = R.read_result(path)
    assert (res.source, res.versions, res.invalid) == ({}, {}, [])


def test_the_shipped_results_files_match_the_schema():
    shipped = list(R.scan_results(R.__file__.rsplit("/analysis/", 1)[0] + "/zoo/study"))
    assert shipped and [str(exc) for _path, _doc, exc in shipped if exc is not None] == []


def test_a_summary_entry_needs_a_value_and_known_fields(tmp_path):
    with pytest.raises(ResultsFileError, match="summary.k.value"):
        R.write_result(tmp_path, "a", "m", "f", {}, {}, {"k": {"verdict": "holds"}})
    with pytest.raises(ResultsFileError, match="summary.k.bogus"):
        R.write_result(tmp_path, "a", "m", "f", {}, {}, {"k": {"value": 1.0, "bogus": 2}})
    assert not list(tmp_path.glob("*.json"))
