"""The observation notebooks, executed by papermill: stored clean, parameterised, and producing
valid results files on the embedded organisms and on a random model of a second family
(DeepSeek-V2: shared experts, a dense first layer)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from summary_checks import CHECKS

from moe_utils.analysis import summary
from moe_utils.analysis.claims import observation
from moe_utils.analysis.results import VERDICTS, read_result

NOTEBOOKS = sorted(Path(__file__).resolve().parents[1].joinpath("notebooks").glob("*.ipynb"))
OBSERVATIONS = [p for p in NOTEBOOKS if observation(p.stem) is not None]
REQUIRED_PARAMETERS = {
    "model",
    "dense_baseline",
    "layers",
    "inputs",
    "max_tokens",
    "dtype",
    "device_map",
    "trust_remote_code",
    "allow_pickle",
    "revision",
    "seed",
    "results_dir",
}


def _moe_book(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moe_utils.publish.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=2400
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebooks_are_stored_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") or c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1


TABLE_LOGIC = re.compile(
    r"^\s*import (pandas|numpy)|\bpd\.|\bnp\.|\.(groupby|merge|pivot|pivot_table|melt|agg|"
    r"query|apply|concat)\("
)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebooks_narrate_and_leave_the_tables_to_the_package(path: Path):
    """Code cells load, call the analysis, draw and display: no pandas or numpy logic of their own."""
    nb = nbformat.read(path, as_version=4)
    found = [
        line.strip()
        for c in nb.cells
        if c.cell_type == "code"
        for line in c.source.splitlines()
        if TABLE_LOGIC.search(line)
    ]
    assert not found, f"{path.name} computes tables itself: {found}"


@pytest.mark.parametrize("path", OBSERVATIONS, ids=[p.stem for p in OBSERVATIONS])
def test_observation_notebooks_take_the_documented_parameters(path: Path):
    from moe_utils.publish.params import notebook_parameters

    declared = notebook_parameters(path)  # what papermill (and moe-book run) reads
    assert set(declared) >= REQUIRED_PARAMETERS
    assert declared["layers"].accepts([0, 3]) and not declared["layers"].accepts("34")
    assert declared["dense_baseline"].accepts(None) and declared["allow_pickle"].accepts(True)


def _check_results(folder: Path) -> dict[str, dict]:
    found = {}
    for nb in OBSERVATIONS:
        res = read_result(folder / "results" / f"{nb.stem}.json")
        for key, entry in res.summary.items():
            assert entry["verdict"] in (*VERDICTS, None), (nb.stem, key, entry)
        found[nb.stem] = res.summary
    return found


@pytest.mark.slow
def test_observations_run_on_a_second_family_with_shared_experts(repo_root: Path, tmp_path: Path):
    run = _moe_book(
        "run",
        "--model",
        "random:deepseek_v2",
        "--notebooks",
        *[p.stem for p in OBSERVATIONS],
        "--out",
        str(tmp_path),
        cwd=repo_root,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    found = _check_results(tmp_path / "random-deepseek_v2")
    assert 0.0 <= found["obs2_router_norms"]["top1_norm_agreement"]["value"] <= 1.0
    sim = read_result(tmp_path / "random-deepseek_v2" / "results" / "obs1_neurons_as_experts.json").tables[
        "weight_similarity"
    ]
    assert "SE" in set(sim.expert_i)  # the shared expert joins the neuron-level maps
    assert 0 not in set(sim.layer)  # DeepSeek-V2's first layer is dense here


@pytest.mark.slow
def test_default_plan_runs_every_notebook_on_the_organisms(repo_root: Path, tmp_path: Path):
    zoo = pytest.importorskip("moe_utils.zoo")
    # 40 held-out windows instead of the page's 120 keep the interventions page to a third of its cost
    run = _moe_book("run", "--out", str(tmp_path), "-p", "max_windows", "40", cwd=repo_root)
    assert run.returncode == 0, run.stdout + run.stderr
    for name in zoo.DEFAULT_MOE_MODELS:
        found = _check_results(tmp_path / name)
        for nb in OBSERVATIONS:  # every summary number recomputed from its own tables
            CHECKS[nb.stem](read_result(tmp_path / name / "results" / f"{nb.stem}.json"))
        obs2 = found["obs2_router_norms"]["top1_norm_agreement"]
        assert obs2["ci_low"] <= obs2["value"] <= obs2["ci_high"]
        executed = nbformat.read(tmp_path / name / "obs1_neurons_as_experts.ipynb", as_version=4)
        injected = next(c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", []))
        assert f"zoo:{zoo.DEFAULT_DENSE_BASELINE}" in injected.source
    table = summary.collect(tmp_path)
    verdicts = summary.verdict_table(table)
    assert len(verdicts) == 4  # one row per claim: observations 1 and 2, the weak and strong forms of 3
    outcomes = "|".join(VERDICTS)
    for name in zoo.DEFAULT_MOE_MODELS:
        assert verdicts[f"zoo:{name}"].str.match(rf"^({outcomes}):").all()
    assert (tmp_path / "book" / "summary.ipynb").exists()
    meta = json.loads((tmp_path / "book" / "summary.ipynb").read_text())["metadata"]
    assert "papermill" in meta
    for name, tables in (
        ("replication", {"verdicts", "emergence", "across_seeds"}),
        ("interventions", {"routing", "ablation", "dense_placement", "topk_sweep"}),
    ):
        res = read_result(tmp_path / "book" / "results" / f"{name}.json")
        assert tables <= set(res.tables), (name, sorted(res.tables))
    inter = read_result(tmp_path / "book" / "results" / "interventions.json").tables
    assert set(inter["routing"].organism) == set(zoo.DEFAULT_MOE_MODELS)
    assert set(inter["routing"].policy) == {"learned", "norm", "random"}
    sweep = inter["topk_sweep"]
    assert (sweep.groupby("organism").k.max() == sweep.groupby("organism").k.count()).all()  # k = 1..E
