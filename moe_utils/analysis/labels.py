"""Expert labels in the analysis tables: routed experts are their indices as strings ("0", "1",
...), "F" is the dense baseline's FFN and "SE" the shared expert(s)."""

from __future__ import annotations

import pandas as pd

DENSE = "F"
SHARED = "SE"


def is_expert(labels: pd.Series) -> pd.Series:
    """True for routed-expert labels (digits), False for "F" and "SE"."""
    return labels.astype(str).str.isdigit()


def distinct_expert_pairs(sim: pd.DataFrame) -> pd.DataFrame:
    """Rows of a pairwise table (``expert_i``, ``expert_j``) between two distinct routed experts."""
    return sim.loc[is_expert(sim.expert_i) & is_expert(sim.expert_j) & (sim.expert_i != sim.expert_j)]
