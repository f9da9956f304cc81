"""moe_utils.publish runner, plan, pages, params and tidy: names, parameters, notebook discovery, planning, tidying, failures."""

from __future__ import annotations

import math
import os
from pathlib import Path

import nbformat
import pytest
from papermill.cli import _resolve_type as papermill_resolve

from moe_utils.core.errors import MoEUtilsError
from moe_utils.core.names import model_slug
from moe_utils.publish import pages, plan
from moe_utils.publish.pages import NotebookInfo, notebook_info, select_notebooks
from moe_utils.publish.params import parse_parameters, parse_value
from moe_utils.publish.plan import RunRequest, plan_jobs, plan_request
from moe_utils.publish.runner import NotebookRunError, run_notebooks
from moe_utils.publish.tidy import tidy_parameters

REPO = Path(__file__).resolve().parents[1]
PER_MODEL = {"moe_book": {"scope": "model"}}
"""The metadata of a stand-in notebook run once per model (the registry knows no ``obs1``)."""


def write_notebook(
    path: Path,
    sources: list[str],
    metadata: dict | None = None,
    parameters: str = 'model = "zoo:x"\nresults_dir = "results"',
) -> Path:
    """A small notebook: a parameters cell, then one code cell per source."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata.update(metadata or {})
    nb.cells = [nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(src) for src in sources]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


# --------------------------------------------------------------------------- slugs


@pytest.mark.parametrize(
    ("model", "slug"),
    [
        ("zoo:tiny-moe-upcycled", "tiny-moe-upcycled"),
        ("mistralai/Mixtral-8x7B-v0.1", "mistralai--Mixtral-8x7B-v0.1"),
        ("random:mixtral", "random-mixtral"),
        ("org/Name with space", "org--Name-with-space"),
        ("zoo:book", "book-model"),
    ],
)
def test_model_slug(model: str, slug: str) -> None:
    assert model_slug(model) == slug


def test_model_slug_of_existing_relative_folder_is_its_name_and_location(tmp_path: Path, monkeypatch) -> None:
    import hashlib

    (tmp_path / "checkpoints" / "my-moe").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    where = (tmp_path / "checkpoints" / "my-moe").resolve()
    expected = "my-moe-" + hashlib.sha256(os.fsencode(where)).hexdigest()[:8]
    # Without the folder this would read as a hub id and become "checkpoints--my-moe".
    assert model_slug("checkpoints/my-moe") == expected
    assert model_slug("./checkpoints/my-moe") == expected == model_slug(str(where))
    assert model_slug("checkpoints/other") == "checkpoints--other"
    assert model_slug("/abs/path/to/My Model/").startswith("My-Model-")


def test_model_slug_rejects_empty() -> None:
    with pytest.raises(MoEUtilsError):
        model_slug("  ")


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "text",
    [
        "30",
        "-4",
        "0.5",
        "1e3",
        "True",
        "False",
        "None",
        "zoo:tiny-dense",
        "bfloat16",
        "org/Name",
        " 7 ",
        "1_000",
        "0x10",
        "inf",
        "true",
    ],
)
def test_parse_value_matches_papermill_for_scalars(text: str) -> None:
    ours, theirs = parse_value(text), papermill_resolve(text)
    assert type(ours) is type(theirs)
    assert ours == theirs or (isinstance(ours, float) and math.isnan(ours) and math.isnan(theirs))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("[0, 5, 10]", [0, 5, 10]),
        ("(1, 2)", (1, 2)),
        ("{'a': 1}", {"a": 1}),
        ("'30'", "30"),
        ("[unclosed", "[unclosed"),
    ],
)
def test_parse_value_reads_literal_containers(text: str, value) -> None:
    assert parse_value(text) == value


def test_parse_parameters() -> None:
    assert parse_parameters([("layers", "[0, 1]"), ("max_tokens", "64"), ("dtype", "float32")]) == {
        "layers": [0, 1],
        "max_tokens": 64,
        "dtype": "float32",
    }
    assert parse_parameters(None) == {}
    with pytest.raises(MoEUtilsError, match="not a Python identifier"):
        parse_parameters([("max-tokens", "1")])
    for reserved in ("model", "dense_baseline", "results_dir", "runs_dir"):
        with pytest.raises(MoEUtilsError, match="set by moe-book"):
            parse_parameters([(reserved, "x")])


# --------------------------------------------------------------------------- notebooks and plans


def test_notebook_kinds_from_the_page_registry_then_metadata(tmp_path: Path) -> None:
    a = write_notebook(tmp_path / "obs1_neurons_as_experts.ipynb", [])
    b = write_notebook(tmp_path / "organisms.ipynb", [])
    c = write_notebook(tmp_path / "replication.ipynb", [])
    d = write_notebook(tmp_path / "extra_analysis.ipynb", [], PER_MODEL)
    e = write_notebook(tmp_path / "obs9.ipynb", [], {"moe_book": {"scope": "book", "place": "front"}})
    f = write_notebook(tmp_path / "obs10.ipynb", [])
    assert notebook_info(a) == NotebookInfo(a, "model", "back")
    assert notebook_info(b) == NotebookInfo(b, "book", "front")
    assert notebook_info(c) == NotebookInfo(c, "book", "back")
    assert notebook_info(d).scope == "model"
    assert (notebook_info(e).scope, notebook_info(e).place) == ("book", "front")
    assert notebook_info(f) == NotebookInfo(f, "book", "back")  # no name rule: unregistered, no metadata
    bad = write_notebook(tmp_path / "bad.ipynb", [], {"moe_book": {"scope": "everything"}})
    with pytest.raises(MoEUtilsError, match="scope"):
        notebook_info(bad)
    contradicting = write_notebook(tmp_path / "summary.ipynb", [], {"moe_book": {"scope": "model"}})
    with pytest.raises(MoEUtilsError, match="registry"):
        notebook_info(contradicting)


def test_every_observation_is_a_per_model_page_and_every_page_a_notebook() -> None:
    from moe_utils.analysis.claims import OBSERVATIONS

    shipped = {nb.name: nb for nb in pages.discover_notebooks(REPO / "notebooks")}
    assert set(pages.BOOK_PAGES) == set(shipped)
    assert {o.notebook for o in OBSERVATIONS} <= {n for n, nb in shipped.items() if nb.scope == "model"}


def test_select_notebooks(tmp_path: Path) -> None:
    nbs = [notebook_info(write_notebook(tmp_path / f"{n}.ipynb", [])) for n in ("obs1", "obs2", "summary")]
    assert select_notebooks(nbs, []) == nbs
    assert [n.name for n in select_notebooks(nbs, ["summary", "obs1.ipynb"])] == ["summary", "obs1"]
    with pytest.raises(MoEUtilsError, match="available: obs1, obs2, summary"):
        select_notebooks(nbs, ["obs3"])


def _infos(tmp_path: Path) -> list[NotebookInfo]:
    return [
        notebook_info(write_notebook(tmp_path / "nbs" / f"{n}.ipynb", [], PER_MODEL if n.startswith("obs") else None))
        for n in ("obs1", "obs2", "organisms", "summary")
    ]


def test_plan_jobs_runs_model_notebooks_per_model_then_book_once(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    jobs = plan_jobs(_infos(tmp_path), ["zoo:a", "org/B"], "zoo:dense", out, {"seed": 3})
    assert [(j.output.relative_to(out).as_posix(), j.model) for j in jobs] == [
        ("a/obs1.ipynb", "zoo:a"),
        ("a/obs2.ipynb", "zoo:a"),
        ("org--B/obs1.ipynb", "org/B"),
        ("org--B/obs2.ipynb", "org/B"),
        ("book/organisms.ipynb", None),
        ("book/summary.ipynb", None),
    ]
    assert jobs[2].parameters == {"seed": 3, "model": "org/B", "dense_baseline": "zoo:dense", "results_dir": "results"}
    assert jobs[-1].parameters == {"seed": 3, "runs_dir": "..", "results_dir": "results"}
    assert jobs[0].label == "a/obs1"
    no_book = plan_jobs(_infos(tmp_path), ["zoo:a"], None, out, include_book=False)
    assert [j.notebook.name for j in no_book] == ["obs1", "obs2"]
    with pytest.raises(MoEUtilsError, match="share folder"):
        plan_jobs(_infos(tmp_path), ["zoo:org--x", "org/x"], None, out)
    local = plan_jobs(_infos(tmp_path), ["zoo:x", "/elsewhere/x"], None, out, include_book=False)
    assert local[0].output.parent.name == "x" != local[-1].output.parent.name


def test_plan_request_default_plan_and_single_model(tmp_path: Path, monkeypatch) -> None:
    _infos(tmp_path)
    monkeypatch.setattr(plan, "default_models", lambda: (["zoo:up", "zoo:scratch"], "zoo:dense"))
    req = RunRequest(notebooks_dir=tmp_path / "nbs", out=tmp_path / "runs")
    jobs = plan_request(req)
    assert [j.label for j in jobs] == [
        "up/obs1",
        "up/obs2",
        "scratch/obs1",
        "scratch/obs2",
        "book/organisms",
        "book/summary",
    ]
    assert {j.parameters.get("dense_baseline") for j in jobs if j.model} == {"zoo:dense"}

    req = RunRequest(notebooks_dir=tmp_path / "nbs", out=tmp_path / "runs", model="random:mixtral")
    jobs = plan_request(req)
    assert [j.label for j in jobs] == ["random-mixtral/obs1", "random-mixtral/obs2"]
    assert jobs[0].parameters["dense_baseline"] is None  # no baseline unless one is named

    req.notebooks = ["summary"]
    assert [j.label for j in plan_request(req)] == ["book/summary"]


# --------------------------------------------------------------------------- tidy


def test_tidy_parameters_tags_only_parameter_cells() -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# title"),
        nbformat.v4.new_code_cell("model = 'a'", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("# Parameters\nmodel = 'b'", metadata={"tags": ["injected-parameters"]}),
        nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["keep-me"]}),
        nbformat.v4.new_code_cell("y = 2"),
    ]
    tidy_parameters(nb)
    tidy_parameters(nb)  # idempotent
    assert [c.metadata.get("tags") for c in nb.cells] == [
        None,
        ["parameters", "remove-cell"],
        ["injected-parameters", "hide-input"],
        ["keep-me"],
        None,
    ]


# --------------------------------------------------------------------------- failure report


@pytest.mark.slow
def test_failing_notebook_is_reported_and_earlier_output_kept(tmp_path: Path, capsys) -> None:
    nbs = tmp_path / "nbs"
    env_names = ("BOOK_BUILD", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")
    write_notebook(nbs / "obs1_ok.ipynb", [f"import os\nprint([os.environ.get(k) for k in {env_names!r}])"], PER_MODEL)
    boom = write_notebook(
        nbs / "obs2_boom.ipynb",
        [
            "a = 1",
            "# this cell fails\nraise ValueError('boom 42')",
            "print('never reached')",
        ],
        PER_MODEL,
    )
    jobs = plan_jobs(pages.discover_notebooks(nbs), ["zoo:tiny"], None, tmp_path / "runs")
    env_before = dict(os.environ)
    with pytest.raises(NotebookRunError) as info:
        run_notebooks(jobs, log=print, root=tmp_path)
    err = info.value
    # Source cells: parameters, "a = 1", the failing cell; papermill adds the injected cell
    # after the parameters cell, so the failing cell is at index 3 of the executed notebook.
    assert err.notebook == boom.name and err.model == "zoo:tiny"
    assert (err.ename, err.evalue) == ("ValueError", "boom 42")
    assert err.cell_index == 3 and err.cell_first_line == "# this cell fails"
    message = str(err)
    for part in ("obs2_boom.ipynb", "zoo:tiny", "cell 3", "# this cell fails", "ValueError: boom 42"):
        assert part in message
    logged = capsys.readouterr().out
    assert "[1/2] tiny/obs1_ok done" in logged and "[2/2] tiny/obs2_boom FAILED" in logged

    ok = nbformat.read(tmp_path / "runs" / "tiny" / "obs1_ok.ipynb", as_version=4)
    assert not ok.metadata.papermill.exception
    # The kernel saw the book-build settings; this process got its environment back.
    assert ok.cells[-1].outputs[0]["text"].strip() == "['1', '1', '1']"
    assert {k: os.environ.get(k) for k in env_names} == {k: env_before.get(k) for k in env_names}
    partial = nbformat.read(err.output, as_version=4)
    assert partial.metadata.papermill.exception is True
    assert not any(
        "never reached" in out.get("text", "") for c in partial.cells if c.cell_type == "code" for out in c.outputs
    )
    assert any("remove-cell" in c.metadata.get("tags", []) for c in partial.cells)
    # Published notebooks carry paths relative to the repository root, not the machine's.
    assert partial.metadata.papermill.input_path == "nbs/obs2_boom.ipynb"
    assert partial.metadata.papermill.output_path == "runs/tiny/obs2_boom.failed.ipynb"
    assert err.output == tmp_path / "runs" / "tiny" / "obs2_boom.failed.ipynb"
    assert not (tmp_path / "runs" / "tiny" / "obs2_boom.ipynb").exists()


def test_default_models_are_zoo_ids(monkeypatch) -> None:
    import types

    fake = types.ModuleType("moe_utils.zoo")
    fake.ZOO_MODELS = ("tiny-dense", "tiny-moe-upcycled", "tiny-moe-scratch")
    fake.DEFAULT_MOE_MODELS = ("tiny-moe-upcycled", "zoo:tiny-moe-scratch", "org/Other")
    fake.DEFAULT_DENSE_BASELINE = "tiny-dense"
    monkeypatch.setattr(plan, "zoo", fake)
    assert plan.default_models() == (["zoo:tiny-moe-upcycled", "zoo:tiny-moe-scratch", "org/Other"], "zoo:tiny-dense")
