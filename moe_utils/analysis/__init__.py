"""Per-observation glue: run the engine and the metrics, return tidy DataFrames for the notebooks."""
