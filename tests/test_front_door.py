"""The front door: ``import moe_utils`` exposes the entry points lazily, and the README's example
runs as written."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

import moe_utils

README = Path(__file__).resolve().parents[1] / "README.md"


def test_import_does_not_load_torch():
    code = "import sys, moe_utils; assert 'torch' not in sys.modules, 'torch loaded'; print(moe_utils.__version__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == moe_utils.__version__


@pytest.mark.parametrize("name", sorted(moe_utils._FRONT_DOOR))
def test_each_name_is_the_function_of_its_module(name):
    module = importlib.import_module(moe_utils._FRONT_DOOR[name])
    assert getattr(moe_utils, name) is getattr(module, name)
    assert name in dir(moe_utils)


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = moe_utils.nope  # type: ignore[attr-defined]


def test_readme_example_computes_observation_2():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    example = next(b for b in blocks if "import moe_utils" in b)
    assert len(example.strip().splitlines()) <= 10
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example, str(README), "exec"), {})
    lines = out.getvalue().strip().splitlines()
    names = [line.split(":")[0] for line in lines]
    assert "norm_preference" in names and "top1_norm_agreement" in names
    for line in lines:
        value = float(line.rsplit(":", 1)[1])
        assert value == value  # a number, not NaN
