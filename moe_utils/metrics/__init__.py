"""Pure metric functions for every experiment of the paper (tensors or arrays in, numpy out).

Modules: ``similarity`` (cosine / angular, matrix level), ``neurons`` (averaging, reordering),
``gate_correlation`` (router vs expert weights), ``outputs`` (expert output similarity),
``norms`` (output norms vs gate scores), ``activations`` (activation ratio), ``projection`` (PCA),
``depth`` (per-layer summaries, last-layer effect), ``routing`` (routing patterns),
``stats`` (confidence intervals).
"""

import types as _types

from .activations import ACTIVE_THRESHOLD, ActivationRatios, activation_ratio
from .depth import LastLayerOutlier, last_layer_outlier, mean_offdiagonal, per_layer_summary, reference_similarity
from .gate_correlation import (
    GateCorrelation,
    GateRegression,
    average_r2,
    gate_expert_correlation,
    gate_expert_regression,
    gate_similarity,
    layer_gate_correlations,
    lower_triangle,
)
from .neurons import (
    ReorderResult,
    neuron_average,
    neuron_cosine_matrix,
    neuron_level_similarity,
    neuron_vectors,
    reorder_layer,
    reorder_neurons,
    resolve_neuron_axis,
)
from .norms import (
    Agreement,
    agreement_by_layer,
    ascending_ranks,
    output_norms,
    rank_counts,
    top1_agreement,
    top_expert,
    topk_norm_agreement,
)
from .outputs import mean_token_similarity, token_similarity
from .projection import Projection, dbscan_outliers, matrix_pca, neuron_pca, pca_projection, standardize
from .routing import (
    RepeatRate,
    adjacent_pairs,
    expert_frequencies,
    expert_runs,
    positions_in_sequence,
    random_overlap_probability,
    repeat_rate,
    routing_table,
    top1_experts,
)
from .similarity import (
    angular_similarity,
    cosine,
    cosine_between,
    cosine_from_gram,
    cosine_matrix,
    gram_matrix,
    matrix_level_similarity,
    stack_with_reference,
)
from .stats import MeanCI, bootstrap_mean_ci, bootstrap_ratio_ci, wilson_interval, z_value

__all__ = sorted(
    name for name, obj in globals().items() if not name.startswith("_") and not isinstance(obj, _types.ModuleType)
)
