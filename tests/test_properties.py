"""Property-based tests of the readers of untrusted input: the safetensors header reader
(``moe_utils.models.checkpoint``, and the header pass of ``moe_utils.models.consistency``), the
``-p NAME VALUE`` parameter parser (``moe_utils.publish.params.parse_parameters`` with the checks of
``moe_utils.publish.params``) and spec derivation from a config (``moe_utils.models.specs``).

For any input they return or raise one of the package's own errors (:class:`MoEUtilsError`); each
call stays under a time bound (hypothesis' deadline) and its Python allocations under a memory
bound (``tracemalloc``; allocations made inside the Rust safetensors reader are not seen by it).
The examples are derandomised, so CI runs the same ones every time.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save

from moe_utils.core.errors import MoEUtilsError
from moe_utils.models.checkpoint import CheckpointReader, find_weight_files, verify_safetensors
from moe_utils.models.consistency import header_tensors
from moe_utils.publish.params import ParamSpec, check_parameters, parse_parameters

EXAMPLES = 120
MEMORY_BOUND = 8 * 2**20  # bytes of Python allocations one call may peak at (inputs are < 4 KiB)

PROPERTIES = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=2),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def within_bounds(call: Callable[[], Any]) -> Any:
    """Run ``call``; a package error counts as an answer. Any other exception fails the property,
    and so does a Python allocation peak above :data:`MEMORY_BOUND`."""
    tracemalloc.start()
    try:
        return call()
    except MoEUtilsError as exc:
        return exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < MEMORY_BOUND, f"peak Python allocation {peak} bytes"


# --------------------------------------------------------------------------- safetensors headers

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
offsets = st.lists(st.integers(-4, 2**66), min_size=0, max_size=3)
tensor_entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "BF16", "F16", "I8", "U8", "BOOL", "F8_E4M3", "X"]),
        "shape": st.lists(st.integers(-2, 2**40), max_size=4),
        "data_offsets": offsets,
    }
)
headers = st.dictionaries(st.text(max_size=12), tensor_entry | json_values, max_size=4) | st.dictionaries(
    st.just("__metadata__"), st.dictionaries(st.text(max_size=4), st.text(max_size=4)), max_size=1
)


VALID = save({"model.layers.0.mlp.gate.weight": np.zeros((4, 8), np.float32), "b": np.ones(3, np.int8)})


@st.composite
def safetensors_bytes(draw: st.DrawFn) -> bytes:
    """A file that is or resembles safetensors: a valid file with some bytes changed or cut, or a
    header length (true or not), a JSON header and data, or raw bytes."""
    kind = draw(st.sampled_from(["mutated", "structured", "lying-length", "raw"]))
    if kind == "raw":
        return draw(st.binary(max_size=300))
    if kind == "mutated":
        data = bytearray(VALID)
        for position, byte in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=4)):
            data[position] = byte
        return bytes(data[: draw(st.integers(0, len(data)))]) if draw(st.booleans()) else bytes(data)
    header = json.dumps(draw(headers)).encode()
    if draw(st.booleans()):
        header = header[: draw(st.integers(0, len(header)))]  # a cut header
    length = len(header) if kind == "structured" else draw(st.integers(0, 2**64 - 1))
    return length.to_bytes(8, "little") + header + draw(st.binary(max_size=200))


@contextlib.contextmanager
def _folder_with(data: bytes) -> Iterator[Path]:
    """A temporary model folder whose only weight file holds ``data``."""
    with tempfile.TemporaryDirectory(prefix="st-prop-") as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(data)
        yield folder


def _read_all(data: bytes) -> None:
    """Every header reader of the package on a folder holding ``data``."""
    with _folder_with(data) as folder:
        files = find_weight_files(folder)
        verify_safetensors(files)
        header_tensors(files)
        with CheckpointReader(folder) as reader:
            for name in reader.names():
                reader.shape(name)
                reader.mapped(name)  # the package's own header parse, after safetensors' check


@PROPERTIES
@given(data=safetensors_bytes())
@example(data=b"")
@example(data=VALID)
@example(data=(2**64 - 1).to_bytes(8, "little") + b"{}")
@example(data=(2).to_bytes(8, "little") + b"{}")
@example(data=(2).to_bytes(8, "little") + b"[]")
@example(data=(30).to_bytes(8, "little") + b'{"t": {"data_offsets": [0, 9]}}')
def test_safetensors_header_readers_answer_or_raise_package_errors(data: bytes) -> None:
    within_bounds(lambda: _read_all(data))


STRING_OFFSET = b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, "9"]}}'
MALFORMED_HEADERS = [
    pytest.param(
        len(STRING_OFFSET).to_bytes(8, "little") + STRING_OFFSET,
        id="string-offset",
    ),
    pytest.param(b"\x40\x9c\x00\x00\x00\x00\x00\x00" + b"[" * 40000, id="deeply-nested-header"),
]


@pytest.mark.parametrize("data", MALFORMED_HEADERS)
def test_verify_safetensors_refuses_malformed_headers_with_its_own_error(data: bytes) -> None:
    with _folder_with(data) as folder, pytest.raises(MoEUtilsError):
        verify_safetensors(find_weight_files(folder))


# --------------------------------------------------------------------------- -p NAME VALUE

DECLARED = {
    "layers": ParamSpec("layers", "Optional[list[int]]", "None"),
    "max_tokens": ParamSpec("max_tokens", "Optional[int]", "None"),
    "seed": ParamSpec("seed", "int", "0"),
    "inputs": ParamSpec("inputs", "str", '"long"'),
    "ratio": ParamSpec("ratio", "float", "0.5"),
    "trust_remote_code": ParamSpec("trust_remote_code", "bool", "False"),
    "options": ParamSpec("options", "Union[dict, None]", "None"),
    "anything": ParamSpec("anything", "Any", "None"),
}

literal_texts = st.recursive(
    st.integers().map(str) | st.floats().map(repr) | st.text(max_size=8).map(repr) | st.sampled_from(["True", "None"]),
    lambda inner: (
        st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]")
        | st.lists(inner, max_size=4).map(lambda xs: "(" + ", ".join(xs) + ",)")
        | st.lists(st.tuples(inner, inner), max_size=3).map(
            lambda kv: "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}"
        )
    ),
    max_leaves=10,
)
values = literal_texts | st.text(max_size=60) | st.text(alphabet="[](){}'\",:-+0123456789ejx. ", max_size=200)
names = st.sampled_from(sorted(DECLARED)) | st.text(max_size=12)


@PROPERTIES
@given(pairs=st.lists(st.tuples(names, values), max_size=3))
@example(pairs=[("layers", "[" * 5000)])
@example(pairs=[("layers", "(" + "-" * 20000 + "1)")])
@example(pairs=[("seed", "9" * 5000)])
@example(pairs=[("options", "{[]: 1}")])
@example(pairs=[("ratio", "1e999")])
@example(pairs=[("model", "zoo:x")])
def test_parameter_parser_answers_or_raises_usage_errors(pairs: list[tuple[str, str]]) -> None:
    def parse_and_check() -> dict[str, Any]:
        parsed = parse_parameters(pairs)
        check_parameters(parsed, DECLARED)
        return parsed

    parsed = within_bounds(parse_and_check)
    if isinstance(parsed, dict):  # accepted: every value has its declared type
        assert set(parsed) <= set(DECLARED)
        for name, value in parsed.items():
            assert DECLARED[name].accepts(value)


def test_the_valid_file_the_mutations_start_from_reads_without_error() -> None:
    assert within_bounds(lambda: _read_all(VALID)) is None


# --------------------------------------------------------------------------- spec derivation

FUZZ_FAMILIES = (
    "glm4_moe",
    "cohere2_moe",
    "ernie4_5_moe",
    "flex_olmo",
    "dots1",
    "exaone_moe",
    "solar_open",
    "minimax_m2",
    "lfm2_moe",
    "granitemoeshared",
    "qwen3_moe",
    "mixtral",
)
DERIVATION_EXAMPLES = 30


def _fuzzed_config(family: str, experts: int, topk: int, layers: int, flips: set[int]) -> dict:
    """The tiny config of ``family`` with its expert count, top-k and depth replaced and some of
    its optional parts flipped: combinations a config class may accept or refuse."""
    from moe_utils.arch.optional_parts import config_variants
    from moe_utils.arch.tiny import _EXPERT_KEYS, _TOPK_KEYS
    from moe_utils.models.random_models import random_config
    from moe_utils.models.specs import get_spec

    cfg = random_config(get_spec(family)).to_dict()
    for keys, value in ((_EXPERT_KEYS, experts), (_TOPK_KEYS, topk)):
        for key in keys:
            if key in cfg:
                cfg[key] = value
    cfg["num_hidden_layers"] = layers
    for i, (_, overrides) in enumerate(config_variants(cfg)):
        if i in flips:
            cfg.update(overrides)
    return cfg


@settings(
    max_examples=DERIVATION_EXAMPLES,
    deadline=timedelta(seconds=60),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    family=st.sampled_from(FUZZ_FAMILIES),
    experts=st.integers(0, 40),
    topk=st.integers(0, 6),
    layers=st.integers(1, 5),
    flips=st.sets(st.integers(0, 3), max_size=3),
)
@example(family="glm4_moe", experts=8, topk=2, layers=2, flips=set())
@example(family="dots1", experts=1, topk=4, layers=1, flips={1})
def test_spec_derivation_answers_or_raises_package_errors(
    family: str, experts: int, topk: int, layers: int, flips: set[int]
) -> None:
    """Any tiny config of these families (expert count, top-k and depth replaced, optional parts
    flipped) gets a spec or one of the package's errors, within the deadline: never another
    exception. (Derivation builds a tiny model, so its allocations are bounded by the tiny sizes;
    the expert count is capped at 40 here.)"""
    from moe_utils.arch.spec import FamilySpec
    from moe_utils.models.specs import spec_for_config

    cfg = _fuzzed_config(family, experts, topk, layers, flips)
    try:
        spec = spec_for_config(cfg)
    except MoEUtilsError as exc:
        event(f"refused: {type(exc).__name__}")
        assert str(exc).strip(), "a package error without a message"
        return
    event("derived")
    assert isinstance(spec, FamilySpec)
