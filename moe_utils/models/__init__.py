"""A model and its files: ids, checkpoints, canonical weights, random models, loading, the trace,
family specs resolved for a model (:mod:`moe_utils.models.specs`, derived where none is
hand-written)."""
