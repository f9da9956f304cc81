"""A model and its files: ids, checkpoints, canonical weights, random models, loading, the trace,
derived family specs.

Importing this package registers the spec derivation with :mod:`moe_utils.arch`, so every lookup of
a family (``get_spec``, ``spec_for_config``) made through this layer or above finds derived specs.
"""

from moe_utils.arch import register_derivation
from moe_utils.models.derive import DERIVATION

register_derivation(DERIVATION)
