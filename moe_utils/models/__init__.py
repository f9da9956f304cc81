"""A model and its files: checkpoints, canonical weights, random models, loading by id, derived specs."""
