"""moe_utils: load Mixture-of-Experts models, trace their experts and measure what the paper measured.

The front door (PEP 562: each name is imported on first use, so ``import moe_utils`` and the
``moe-book`` command start without torch)::

    import moe_utils

    study = moe_utils.open_study("zoo:tiny-moe-scratch")
    report = moe_utils.norms_report(study, max_tokens=256)   # observation 2
    report.summary

``open_study`` opens a model (and its dense baseline) for the analyses, ``load_model`` loads one by
id, ``trace`` records what each MoE block did on some tokens, ``get_spec``/``spec_for_config``
resolve a family spec; ``neurons_report``, ``norms_report`` and ``depth_report`` compute
observations 1, 2 and 3 on a study.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> module defining it. Modules are imported when a name is first used.
_FRONT_DOOR: dict[str, str] = {
    "open_study": "moe_utils.analysis.context",
    "load_model": "moe_utils.models.loading",
    "trace": "moe_utils.models.trace",
    "get_spec": "moe_utils.models.specs",
    "spec_for_config": "moe_utils.models.specs",
    "neurons_report": "moe_utils.analysis.obs1_neurons",
    "norms_report": "moe_utils.analysis.obs2_norms",
    "depth_report": "moe_utils.analysis.obs3_depth",
}

__all__ = ["__version__"]  # the front door's names are resolved by __getattr__ (see __dir__)


def __getattr__(name: str) -> Any:
    module = _FRONT_DOOR.get(name)
    if module is None:
        raise AttributeError(f"module 'moe_utils' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_FRONT_DOOR])
