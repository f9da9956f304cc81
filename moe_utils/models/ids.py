"""What a model id points to: ``zoo:NAME``, ``random:FAMILY``, a local folder, or a hub id.

Hub ids are fetched into the Hugging Face cache (or found there) with config, safetensors and
tokenizer files only; Python files only when the caller opted into remote code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from moe_utils.arch import SPECS, derivable_family
from moe_utils.core.errors import CheckpointError, OfflineError
from moe_utils.core.messages import first_line
from moe_utils.core.paths import zoo_path
from moe_utils.models.fingerprint import hub_revision


@dataclass
class ModelRef:
    """Where a model id points: its kind, folder (if any) and, for random ids, the family."""

    name: str
    kind: Literal["zoo", "random", "local", "hub"]
    path: Path | None = None
    family: str | None = None
    revision: str | None = None  # hub commit of the snapshot (or the revision asked for)

    def source(self) -> dict[str, Any]:
        """What results files record about where the model came from (no local path)."""
        return {"kind": self.kind, "id": self.name, "revision": self.revision}


def resolve_model(model: str | Path, revision: str | None = None, include_code: bool = False) -> ModelRef:
    """Classify a model id; folders must exist, hub ids are fetched (or found in the local cache).

    Hub downloads fetch config, safetensors and tokenizer files; Python files only when
    ``include_code`` (i.e. the caller passed ``trust_remote_code=True``).
    """
    text = str(model)
    if text.startswith("zoo:"):
        return ModelRef(text, "zoo", zoo_path(text[4:]))
    if text.startswith("random:"):
        family = text[len("random:") :]
        if family not in SPECS:
            derivable_family(family)  # raises UnknownFamilyError with the list of families
        return ModelRef(text, "random", None, family)
    path = Path(text).expanduser()
    if path.is_dir():
        # Named by its folder name only: published pages and results carry no local path.
        return ModelRef(path.resolve().name or text, "local", path.resolve())
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointError(
            f"{text!r} is neither a model folder nor a hub id (org/name); pass a "
            "folder containing config.json and *.safetensors, 'zoo:NAME' or "
            "'random:FAMILY'"
        )
    snapshot = _hub_snapshot(text, revision, include_code)
    return ModelRef(text, "hub", snapshot, revision=hub_revision(snapshot) or revision)


def _hub_snapshot(repo_id: str, revision: str | None, include_code: bool = False) -> Path:
    """A local snapshot of a hub repo (config, safetensors, tokenizer; code only if asked)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    if include_code:
        patterns.append("*.py")
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=patterns))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:
        raise OfflineError(
            f"{repo_id!r} cannot be downloaded here ({first_line(exc)}) and is not in the local Hugging Face cache. If this "
            "machine is offline, download the model elsewhere and pass its local "
            "folder instead; otherwise check the id and revision."
        ) from exc


def resolve_folder(model: str | Path) -> Path:
    """Folder holding a model's files (for streaming weights); random ids have none."""
    ref = resolve_model(model)
    if ref.path is None:
        raise CheckpointError(
            f"{ref.name} has no files on disk; load it with load_model() and pass the LoadedModel instead"
        )
    return ref.path
