"""Notebook parameters as the notebooks declare them, and checks of user values against them.

The names, types and defaults come from each notebook's cell tagged ``parameters`` (read with
papermill's own inspector), so there is no second list to keep in sync. A line such as::

    layers: "Optional[list[int]]" = None   # every MoE layer when None

declares a type; without an annotation the type is that of the default value (``seed = 0`` is an
int), and a ``None`` default accepts anything. Annotations understood: ``int``, ``float``,
``str``, ``bool``, ``None``, ``Any``, ``dict``, ``list[X]``, ``tuple``, ``Optional[X]`` and
``Union[X, Y, ...]``. The annotation is resolved once into a Python type (:func:`parameter_type`)
and values are checked against it by pydantic, with strict scalars: a bool is not an int here, a
string is never read as a number or a list, and a tuple is accepted where a list is declared.
"""

from __future__ import annotations

import ast
import difflib
import functools
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional, Union, get_args, get_origin

from pydantic import StrictBool, StrictFloat, StrictInt, StrictStr, TypeAdapter, ValidationError

from moe_utils.core.errors import ParameterDeclarationError, UsageError


@dataclass(frozen=True)
class ParamSpec:
    """One declared parameter: name, type text (annotation or inferred), default text, help."""

    name: str
    type_text: str
    default: str
    help: str = ""

    @property
    def annotation(self) -> Any:
        """The Python type the declaration names (see :func:`parameter_type`)."""
        return parameter_type(self.type_text)

    def accepts(self, value: Any) -> bool:
        """True when ``value`` has the declared type."""
        try:
            _adapter(self.type_text).validate_python(value)
        except ValidationError:
            return False
        return True


_NAMES: dict[str, Any] = {
    "int": StrictInt,
    "float": StrictFloat,
    "str": StrictStr,
    "bool": StrictBool,
    "None": None,
    "Any": Any,
    "dict": dict,
    "list": list,
    "List": list,
    "tuple": tuple,
    "Optional": Optional,
    "Union": Union,
}
_WORDS: dict[Any, str] = {
    int: "an int",
    float: "a number",
    str: "a string",
    bool: "True or False",
    type(None): "None",
    Any: "any value",
    dict: "a dict",
    list: "a list",
    tuple: "a tuple",
}
_NODES = (ast.Expression, ast.Name, ast.Subscript, ast.Tuple, ast.Load)


@functools.cache
def parameter_type(type_text: str) -> Any:
    """The Python type an annotation of a parameters cell names: ``"Optional[list[int]]"`` ->
    ``Optional[list[StrictInt]]``. Only the names of the module docstring are understood."""
    unsupported = ParameterDeclarationError(f"unsupported parameter annotation {type_text!r}")
    try:
        tree = ast.parse(type_text.strip(), mode="eval")
    except SyntaxError as exc:
        raise unsupported from exc
    for node in ast.walk(tree):
        none = isinstance(node, ast.Constant) and node.value is None
        if not (none or isinstance(node, _NODES)) or (isinstance(node, ast.Name) and node.id not in _NAMES):
            raise unsupported
    try:
        return eval(compile(tree, "<parameter annotation>", "eval"), {"__builtins__": {}}, dict(_NAMES))
    except TypeError as exc:
        raise unsupported from exc


@functools.cache
def _adapter(type_text: str) -> TypeAdapter:
    return TypeAdapter(parameter_type(type_text))


def _say(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _say(args[0])
    if origin in (Union, types.UnionType):
        return " or ".join(_say(a) for a in args)
    if origin is list and args:
        item = _say(args[0]).removeprefix("an ").removeprefix("a ")
        return f"a list of {item}s"
    if tp is None:
        return "None"
    return _WORDS.get(origin or tp, getattr(tp, "__name__", str(tp)))


def describe_type(type_text: str) -> str:
    """Words for a type: ``Optional[list[int]]`` -> ``a list of ints or None``."""
    return _say(parameter_type(type_text))


def _inferred_type(default: str) -> str:
    try:
        value = ast.literal_eval(default)
    except (ValueError, SyntaxError):
        return "Any"
    if value is None:
        return "Any"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        kinds = {_inferred_type(repr(v)) for v in value}
        return f"list[{kinds.pop()}]" if len(kinds) == 1 and "Any" not in kinds else "list"
    if isinstance(value, dict):
        return "dict"
    return "Any"


def notebook_parameters(path: str | Path) -> dict[str, ParamSpec]:
    """The parameters declared in the ``parameters`` cell of the notebook at ``path``."""
    from papermill.inspection import _infer_parameters
    from papermill.iorw import load_notebook_node

    path = Path(path)
    try:
        nb = load_notebook_node(str(path))
    except Exception as exc:
        raise UsageError(f"cannot read notebook {path}: {type(exc).__name__}: {exc}") from exc
    specs = {}
    for p in _infer_parameters(nb):
        type_text = p.inferred_type_name if p.inferred_type_name not in ("None", "") else _inferred_type(p.default)
        specs[p.name] = ParamSpec(p.name, type_text, p.default, p.help)
    return specs


def check_parameters(
    values: Mapping[str, Any], declared: Mapping[str, ParamSpec], where: str = "the notebooks"
) -> None:
    """Raise :class:`UsageError` for a name not declared or a value of the wrong type.

    The message for an unknown name lists the valid ones and the closest match; for a wrong
    type it names the parameter, the expected type and the value received, on one line.
    """
    for name, value in values.items():
        spec = declared.get(name)
        if spec is None:
            close = difflib.get_close_matches(name, list(declared), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UsageError(
                f"unknown parameter {name!r} for {where}.{hint} Valid names: {', '.join(sorted(declared))}"
            )
        if not spec.accepts(value):
            raise UsageError(
                f"parameter {name!r} must be {describe_type(spec.type_text)}; got {value!r} ({type(value).__name__})"
            )


RESERVED_PARAMETERS = ("model", "dense_baseline", "results_dir", "runs_dir")
"""Parameters the runner sets itself; ``-p`` may not override them (use the flags instead)."""


def parse_value(text: str) -> Any:
    """A ``-p`` value read the way papermill's own ``-p`` reads it, plus literal containers.

    Like papermill: ``"True"``/``"False"``/``"None"`` -> bool/None, ``"30"`` -> 30,
    ``"0.5"`` -> 0.5, anything else -> the string itself (``"zoo:tiny-dense"``). In addition a
    Python list, tuple, dict or quoted string literal is parsed: ``"[0, 3]"`` -> [0, 3].
    """
    constants = {"True": True, "False": False, "None": None}
    if text in constants:
        return constants[text]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.strip()[:1] in ("[", "(", "{", "'", '"'):
        try:
            return ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
    return text


def parse_parameters(pairs: Iterable[Sequence[str]] | None) -> dict[str, Any]:
    """``[("layers", "[0, 1]"), ...]`` -> ``{"layers": [0, 1]}``; rejects bad or reserved names."""
    params: dict[str, Any] = {}
    for pair in pairs or ():
        name, value = pair
        if not name.isidentifier():
            raise UsageError(f"parameter name {name!r} is not a Python identifier")
        if name in RESERVED_PARAMETERS:
            raise UsageError(f"-p {name} is set by moe-book itself; use --model / --dense-baseline / --out instead")
        params[name] = parse_value(value)
    return params
