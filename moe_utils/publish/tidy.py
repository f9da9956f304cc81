"""An executed notebook made ready to publish: cells tagged for the book, final paths, the model's name.

The runner executes a notebook into a staging folder (:mod:`moe_utils.publish.staging`); before it
lands, the parameters cells are tagged (defaults hidden, injected values behind a toggle), the
injected cell and outputs name the final results folder, papermill's paths become relative to
the repository, and the page's title names the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat

from moe_utils.core.names import model_label


def tidy_parameters(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Tag parameter cells for the book: defaults removed, injected values behind a toggle.

    The cell tagged ``parameters`` gets ``remove-cell``; the ``injected-parameters`` cell gets
    ``hide-input``. Idempotent; returns the same notebook object.
    """
    for cell in nb.cells:
        tags = list(cell.get("metadata", {}).get("tags", []))
        add = []
        if "parameters" in tags and "remove-cell" not in tags:
            add.append("remove-cell")
        if "injected-parameters" in tags and "hide-input" not in tags:
            add.append("hide-input")
        if add:
            cell.setdefault("metadata", {})["tags"] = tags + add
    return nb


def relative_paths_in_metadata(nb: nbformat.NotebookNode, base: Path) -> None:
    """Replace papermill's input/output paths by paths relative to ``base`` (the repository
    root) or, for files outside it, by their names: published notebooks name no local folders.
    """
    meta = nb.metadata.get("papermill", {})
    base = base.resolve()
    for key in ("input_path", "output_path"):
        value = meta.get(key)
        if value:
            path = Path(value).resolve()
            meta[key] = path.relative_to(base).as_posix() if path.is_relative_to(base) else path.name


def final_parameters(nb: nbformat.NotebookNode, parameters: dict[str, Any], output: Path) -> None:
    """Show ``parameters`` (the final results folder, not the staging one) in the injected cell
    and record ``output`` (where the notebook lands) as papermill's output path."""
    from papermill.translators import translate_parameters

    kernel = nb.metadata.get("kernelspec", {}).get("name", "python3")
    language = nb.metadata.get("kernelspec", {}).get("language", "python")
    for cell in nb.cells:
        if "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            cell.source = translate_parameters(kernel, language, parameters, "Parameters")
    if "papermill" in nb.metadata:
        nb.metadata.papermill["parameters"] = parameters
        nb.metadata.papermill["output_path"] = str(output)


def unstage_outputs(nb: nbformat.NotebookNode, staging: str) -> None:
    """Outputs that name the staging folder (``wrote .staging-.../results/x.json``) name the final
    folder instead, where the files are once the run is published."""
    prefix = f"{staging}/"

    def fix(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(prefix, "")
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    for cell in nb.cells:
        for out in cell.get("outputs", []):
            for key in ("text", "traceback", "evalue"):
                if key in out:
                    out[key] = fix(out[key])
            for mime, value in out.get("data", {}).items():
                if mime.startswith("text/"):
                    out["data"][mime] = fix(value)


def reader_label(model: str) -> str:
    """The model's name on the pages: :func:`model_label` without the ``zoo:`` prefix of the
    embedded models (``zoo:tiny-moe-fine`` -> ``tiny-moe-fine``)."""
    return model_label(model).removeprefix("zoo:")


def name_model_in_heading(nb: nbformat.NotebookNode, label: str) -> nbformat.NotebookNode:
    """Append the model's name to the page's title (the first ``# `` heading), so that the pages of
    one notebook run on several models have distinct titles. Idempotent."""
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        lines = cell.source.split("\n")
        for i, line in enumerate(lines):
            if line.startswith("# "):
                suffix = f" ({label})"
                if not line.rstrip().endswith(suffix):
                    lines[i] = line.rstrip() + suffix
                    cell.source = "\n".join(lines)
                return nb
    return nb
