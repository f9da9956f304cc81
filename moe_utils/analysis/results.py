"""Tidy results files: one JSON file per (model, analysis), written atomically.

Every analysis page writes its numbers to ``<results_dir>/<analysis>.json`` (``results_dir`` is
one folder per model) and the summary page only reads these files.

Schema ``moe-book-results/1``::

    {
      "schema": "moe-book-results/1",        # always the first key
      "analysis": "obs2_router_norms",       # file name without .json; [A-Za-z0-9_.-]
      "model": "zoo:tiny-moe-upcycled",      # the model id exactly as the user gave it
      "fingerprint": "3f2a...",              # stable hash of config + weight files
      "params": {...},                        # every parameter the numbers depend on
      "created": "2026-11-29T10:00:00+00:00", # ISO 8601, UTC
      "package_version": "0.1.0",            # moe_utils.__version__ that wrote the file
      "source": {                             # optional: where the model came from
        "kind": "hub",                        # "zoo" | "random" | "local" | "hub"
        "id": "org/Name",                     # the id (a local folder by its name only)
        "revision": "6f2c...",                # hub commit of the snapshot, or null
        "fingerprint": "3f2a..."              # the content fingerprint again
      },
      "versions": {"moe_utils": "0.1.0", "torch": "2.9.0", ...},  # optional: packages used
      "tables": {                             # tidy tables: name -> list of records (one per row)
        "rank_counts": [{"layer": 0, "score_rank": 1, "norm_rank": 1, "count": 12}, ...]
      },
      "invalid": [],                          # optional; excluded non-finite tensors (see below)
      "summary": {                            # headline numbers: key -> entry
        "top1_norm_agreement": {
          "value": 0.61,                      # number (or null when undefined)
          "ci_low": 0.55, "ci_high": 0.67,    # interval bounds or null
          "baseline": 0.125,                  # what chance / a null model gives, or null
          "verdict": "holds",                 # one of VERDICTS, or null for a descriptive number
          "paper": {"Mixtral 8x7B": 0.69},    # the paper's value per model, may be empty
          "note": "cluster bootstrap over 10 sequences"
          # a claim's entry also has: observed, null, floor, se, df, interval, p_value, power (p_holm)
        }
      }
    }

``invalid`` lists, one record each (``layer, expert, tensor, n_nan, n_inf``), the tensors with
NaN or infinite values that a run left out because it was started with ``allow_invalid = True``.
A file with a non-empty ``invalid`` describes a damaged model: its numbers exclude those experts.
Files without the field (older ones) are valid.

NaN and infinities are stored as ``null``; numpy scalars and arrays become plain numbers and
lists. A ``null`` verdict marks a descriptive number that is not a test of a claim.

Writes go to a temporary file in the same folder, which is flushed, fsync'ed and then moved over
the target with ``os.replace``, so a reader sees either the old file or the new one, never half a
file. The schema is one typed model (:class:`ResultsFile`, pydantic, strict: no field is coerced
and no unknown field is accepted); the writer checks a document against it before writing and
readers after reading, and a mismatch raises ``ResultsFileError`` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, TypeAdapter, ValidationError

from moe_utils import __version__
from moe_utils.core.errors import ResultsFileError, UnstorableValueError
from moe_utils.core.files import atomic_write_text as _atomic_write_text

SCHEMA = "moe-book-results/1"
SUMMARY_FIELDS = ("value", "ci_low", "ci_high", "baseline", "verdict", "paper", "note")
# Optional fields of a claim's entry: the observed statistic, its computed null, the effect floor,
# the standard error and degrees of freedom of the interval, its method, p-values and power.
EFFECT_FIELDS = ("observed", "null", "floor", "se", "df", "interval", "p_value", "p_holm", "power")
_TOP_FIELDS = (
    "schema",
    "analysis",
    "model",
    "fingerprint",
    "params",
    "created",
    "package_version",
    "tables",
    "summary",
)
_OPTIONAL_FIELDS = ("source", "versions", "invalid")  # absent in files written before they existed
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_PREFIX = '{"schema":"moe-book-results/'
BOOK_LEVEL_MODEL = "organism study"  # the ``model`` of results that span many models (study, interventions)

Verdict = Literal["holds", "detectable but below the floor", "inconclusive", "does not hold", "undefined"]
Number = StrictFloat | None  # a JSON number (an int is a number too); NaN and infinities are stored as null


class _Schema(BaseModel):
    """Strict JSON: nothing coerced, no field the schema does not name."""

    model_config = ConfigDict(strict=True, extra="forbid")


class SummaryEntry(_Schema):
    """One headline number: value, interval, chance baseline, verdict, the paper's values, a note;
    a claim's entry also carries its effect statistics (:data:`EFFECT_FIELDS`)."""

    value: Number
    ci_low: Number
    ci_high: Number
    baseline: Number
    verdict: Verdict | None
    paper: dict[str, Any]
    note: StrictStr
    observed: Number = None
    null: Number = None
    floor: Number = None
    se: Number = None
    df: Number = None
    interval: StrictStr | None = None
    p_value: Number = None
    p_holm: Number = None
    power: Number = None


class ModelSource(_Schema):
    """Where the model came from: ``kind`` (zoo, random, local, hub), its id, hub revision, fingerprint."""

    kind: StrictStr | None = None
    id: StrictStr | None = None
    revision: StrictStr | None = None
    fingerprint: StrictStr | None = None


class InvalidTensor(_Schema):
    """A tensor with NaN or infinite values that a run left out (``allow_invalid``)."""

    layer: StrictInt
    expert: StrictInt | None
    tensor: StrictStr
    n_nan: StrictInt
    n_inf: StrictInt


class ResultsFile(_Schema):
    """A results file as stored (schema ``moe-book-results/1``): see the module docstring."""

    schema_: Literal["moe-book-results/1"] = Field(alias="schema")
    analysis: StrictStr
    model: StrictStr
    fingerprint: StrictStr
    params: dict[str, Any]
    created: StrictStr
    package_version: StrictStr
    tables: dict[str, list[dict[str, Any]]]
    summary: dict[str, SummaryEntry]
    source: ModelSource = ModelSource()
    versions: dict[str, StrictStr] = {}
    invalid: list[InvalidTensor] = []


VERDICTS: tuple[str, ...] = get_args(Verdict)
_VERDICT = TypeAdapter(Verdict | None)


def schema_error(exc: ValidationError) -> str:
    """The first problem of a validation error on one line: ``field summary.k.verdict: <why>``."""
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or "(top level)"
    return f"field {where}: {' '.join(str(err['msg']).split())}"


@dataclasses.dataclass
class Result:
    """A results file in memory; ``tables`` are DataFrames, ``summary`` entries are dicts."""

    analysis: str
    model: str
    fingerprint: str
    params: dict[str, Any]
    created: str
    package_version: str
    tables: dict[str, pd.DataFrame]
    summary: dict[str, dict[str, Any]]
    path: Path | None = None
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    invalid: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def is_invalid(self) -> bool:
        """True when the run excluded non-finite weights (``allow_invalid``)."""
        return bool(self.invalid)

    def value(self, key: str) -> Any:
        """The ``value`` of one summary entry."""
        return self.summary[key]["value"]

    def summary_frame(self) -> pd.DataFrame:
        """The summary as a tidy table, one row per key."""
        rows = [{"key": k, **{f: e.get(f) for f in SUMMARY_FIELDS}} for k, e in self.summary.items()]
        return pd.DataFrame(rows, columns=["key", *SUMMARY_FIELDS])


def summary_entry(
    value: Any,
    ci_low: Any = None,
    ci_high: Any = None,
    baseline: Any = None,
    verdict: str | None = "inconclusive",
    paper: Mapping[str, Any] | None = None,
    note: str = "",
) -> dict[str, Any]:
    """Build one summary entry with every schema field present."""
    entry = {
        "value": value,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "baseline": baseline,
        "verdict": verdict,
        "paper": dict(paper or {}),
        "note": note,
    }
    _check_verdict(verdict, "summary_entry")
    return entry


def _check_verdict(verdict: Any, where: str) -> None:
    try:
        _VERDICT.validate_python(verdict)
    except ValidationError:
        raise ResultsFileError(f"{where}: verdict must be one of {VERDICTS} or None; got {verdict!r}") from None


def to_jsonable(obj: Any) -> Any:
    """Convert numpy/pandas/Path values to plain JSON types; NaN and infinities become ``None``."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj
        return [to_jsonable(v) for v in items]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (pd.Timestamp, _dt.datetime, _dt.date)):
        return obj.isoformat()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if obj is pd.NA or obj is pd.NaT:
        return None
    item = getattr(obj, "item", None)
    if callable(item):  # torch / numpy 0-d values
        return to_jsonable(item())
    raise UnstorableValueError(f"cannot store a value of type {type(obj).__name__} in a results file: {obj!r}")


def _table_records(name: str, table: Any) -> list[dict[str, Any]]:
    if isinstance(table, pd.DataFrame):
        df = table
        if not isinstance(df.index, pd.RangeIndex) or any(n is not None for n in df.index.names):
            df = df.reset_index()
        df = df.astype(object).where(pd.notna(df), None)
        records = df.to_dict(orient="records")
    elif isinstance(table, list):
        records = table
    else:
        raise UnstorableValueError(
            f"table {name!r} must be a DataFrame or a list of records; got {type(table).__name__}"
        )
    out = to_jsonable(records)
    if not all(isinstance(r, dict) for r in out):
        raise UnstorableValueError(f"table {name!r}: every record must be a mapping of column -> value")
    return out


def _summary_entries(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each entry with every :data:`SUMMARY_FIELDS` present (a bare number gets a ``null`` verdict)."""
    out = {}
    for key, entry in summary.items():
        if isinstance(entry, Mapping):
            full = {k: v for k, v in summary_entry(None).items() if k != "value"}  # "value" is required
            full.update(entry)
        else:
            full = summary_entry(entry, verdict=None)
        full["paper"] = dict(full["paper"] or {})
        full["note"] = "" if full["note"] is None else str(full["note"])
        out[str(key)] = to_jsonable(full)
    return out


def _check_name(analysis: str) -> None:
    if not isinstance(analysis, str) or not _NAME_RE.match(analysis):
        raise ResultsFileError(
            f"analysis name {analysis!r} must be non-empty and use only letters, digits, '_', '.', '-'"
        )


def result_path(results_dir: str | Path, analysis: str) -> Path:
    """Where the results file of ``analysis`` lives inside ``results_dir``."""
    _check_name(analysis)
    return Path(results_dir) / f"{analysis}.json"


def _package_version() -> str:
    return str(__version__)


def package_versions() -> dict[str, str]:
    """Versions of moe_utils and of the libraries its numbers depend on (those installed)."""
    from importlib import metadata

    out = {"moe_utils": _package_version()}
    for name in ("torch", "transformers", "safetensors", "numpy", "scipy", "pandas"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def write_result(
    results_dir: str | Path,
    analysis: str,
    model: str,
    fingerprint: str,
    params: Mapping[str, Any],
    tables: Mapping[str, pd.DataFrame | list],
    summary: Mapping[str, Any],
    source: Mapping[str, Any] | None = None,
    invalid: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Validate and atomically write ``<results_dir>/<analysis>.json``; return its path.

    ``source`` (kind, id, revision of the model) is recorded with the fingerprint; the versions of
    the packages that computed the numbers are always recorded.

    A summary value may be a full entry (a dict with any of ``SUMMARY_FIELDS``, ``value``
    required; missing fields are filled) or a bare number (stored with a ``null`` verdict).
    ``invalid`` records the non-finite tensors the run excluded (empty: a valid run).
    """
    path = result_path(results_dir, analysis)
    doc = {
        "schema": SCHEMA,
        "analysis": analysis,
        "model": str(model),
        "fingerprint": str(fingerprint),
        "params": to_jsonable(dict(params)),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "package_version": _package_version(),
        "tables": {str(k): _table_records(str(k), v) for k, v in tables.items()},
        "invalid": to_jsonable([dict(r) for r in (invalid or [])]),
        "summary": _summary_entries(summary),
        "source": {**to_jsonable(dict(source or {})), "fingerprint": str(fingerprint)},
        "versions": package_versions(),
    }
    try:
        ResultsFile.model_validate(doc)
    except ValidationError as exc:
        raise ResultsFileError(f"results {analysis!r} for {path} not written: {schema_error(exc)}") from None
    text = json.dumps(doc, indent=1, allow_nan=False, ensure_ascii=False)
    _atomic_write_text(path, text + "\n")
    return path


def _invalid(path: Path, why: str) -> ResultsFileError:
    return ResultsFileError(
        f"{path} is not a valid results file ({why}). It may be half-written by an interrupted run or "
        f"from another version: delete it and rerun the analysis that writes it."
    )


def _validate(doc: Any, path: Path) -> None:
    """Check ``doc`` against :class:`ResultsFile`; :class:`ResultsFileError` naming the field."""
    try:
        ResultsFile.model_validate(doc)
    except ValidationError as exc:
        raise _invalid(path, schema_error(exc)) from None


def _load_doc(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ResultsFileError(f"no results file at {path}: run the analysis that writes it first")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _invalid(path, f"it cannot be read: {exc}") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _invalid(path, f"it is not complete JSON, possibly truncated: {exc.msg} at character {exc.pos}") from exc
    _validate(doc, path)
    return doc


def read_result(path_or_dir: str | Path, analysis: str | None = None) -> Result:
    """Read and validate one results file: a path to the file, or a results folder plus ``analysis``."""
    p = Path(path_or_dir)
    if p.is_dir():
        if analysis is None:
            raise ResultsFileError(f"{p} is a folder: also pass the analysis name to read")
        p = result_path(p, analysis)
    doc = _load_doc(p)
    if analysis is not None and doc["analysis"] != analysis:
        raise _invalid(p, f"it holds analysis {doc['analysis']!r}, not {analysis!r}")
    return _result(doc, p)


def _result(doc: dict[str, Any], p: Path) -> Result:
    """A validated document as a :class:`Result` (tables as DataFrames)."""
    return Result(
        analysis=doc["analysis"],
        model=doc["model"],
        fingerprint=doc["fingerprint"],
        params=doc["params"],
        created=doc["created"],
        package_version=doc["package_version"],
        tables={k: pd.DataFrame.from_records(v) for k, v in doc["tables"].items()},
        summary=doc["summary"],
        path=p,
        source=doc.get("source", {}),
        versions=doc.get("versions", {}),
        invalid=list(doc.get("invalid", [])),
    )


def _looks_like_results(path: Path) -> bool:
    """True when the file starts like a results file (the writer puts ``schema`` first)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(200).decode("utf-8", "replace")
    except OSError:
        return False
    return "".join(head.split()).startswith(_PREFIX)


def scan_results(
    root: str | Path, pattern: str = "**/*.json"
) -> Iterator[tuple[Path, dict[str, Any] | None, ResultsFileError | None]]:
    """Each results-like file matching ``pattern`` under ``root`` (sorted; default: every folder
    below it), with its validated document or the error. Files whose name starts with a dot
    (half-written temporaries) and JSON files that do not start like a results file are skipped.
    """
    for path in sorted(Path(root).glob(pattern)):
        if path.name.startswith(".") or not _looks_like_results(path):
            continue
        try:
            yield path, _load_doc(path), None
        except ResultsFileError as exc:
            yield path, None, exc


def iter_results(root: str | Path, pattern: str = "**/*.json") -> Iterator[Result]:
    """The results files of :func:`scan_results` as :class:`Result` objects; a file that starts
    like a results file but fails validation raises its :class:`ResultsFileError`."""
    for path, doc, exc in scan_results(root, pattern):
        if doc is None:
            raise exc or _invalid(path, "it could not be read")
        yield _result(doc, path)


def find_results(root: str | Path) -> pd.DataFrame:
    """List every results file under ``root`` (recursively), valid or not, one row per file.

    Columns: ``path, analysis, model, fingerprint, created, package_version, tables, n_summary,
    valid, error``. Files that start like a results file but fail validation are listed with
    ``valid=False`` and the reason in ``error``, so a broken run is visible rather than skipped.
    """
    cols = [
        "path",
        "analysis",
        "model",
        "fingerprint",
        "created",
        "package_version",
        "tables",
        "n_summary",
        "valid",
        "error",
    ]
    rows = []
    for path, doc, exc in scan_results(root):
        if doc is None:  # unreadable: exc says why
            rows.append({"path": str(path), "valid": False, "error": str(exc)})
            continue
        rows.append(
            {
                "path": str(path),
                "analysis": doc["analysis"],
                "model": doc["model"],
                "fingerprint": doc["fingerprint"],
                "created": doc["created"],
                "package_version": doc["package_version"],
                "tables": sorted(doc["tables"]),
                "n_summary": len(doc["summary"]),
                "valid": True,
                "error": "",
            }
        )
    return pd.DataFrame(rows, columns=cols)


def summary_rows(root: str | Path) -> pd.DataFrame:
    """Every summary entry of every valid results file under ``root``, one row per (file, key)."""
    rows = []
    for path, doc, _exc in scan_results(root):
        if doc is None:  # unreadable (find_results lists it)
            continue
        for key, e in doc["summary"].items():
            rows.append(
                {
                    "model": doc["model"],
                    "analysis": doc["analysis"],
                    "key": key,
                    **{f: e.get(f) for f in SUMMARY_FIELDS},
                    "path": str(path),
                }
            )
    return pd.DataFrame(rows, columns=["model", "analysis", "key", *SUMMARY_FIELDS, "path"])
