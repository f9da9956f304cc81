"""Small-scale correctness of the real-width code paths: randomized neuron PCA against the full SVD,
one-pass Gram matrices and blocked cosines against naive computations, reordering against the
plain float64 algorithm, workers=2 against workers=1, chunked expert evaluation against the whole
tensor, file reads against the memory map, and progress bars kept out of cell outputs."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import kendalltau
from sklearn.decomposition import PCA
from tiny_models import tiny

from moe_utils import metrics as M
from moe_utils.analysis import static
from moe_utils.core.progress import PROGRESS_ENV, progress, relay
from moe_utils.engine.expert_math import expert_intermediates, iter_expert_intermediates
from moe_utils.metrics import projection
from moe_utils.metrics.blocks import neuron_blocks, neuron_rows
from moe_utils.metrics.neurons import neuron_cosine_matrix, reorder_neurons
from moe_utils.metrics.projection import (
    flattened_grams,
    flattened_pass,
    matrix_pca_from_gram,
    neuron_pca,
    randomized_neuron_pca,
    sketch_matrix,
    sketch_width,
)
from moe_utils.models.checkpoint import CheckpointReader
from moe_utils.models.weights import layer_weights


def structured_stack(rng, e=4, i=300, h=48, rank=3, mean=2.0):
    """Experts whose neurons lie near a shared low-rank subspace (a decaying spectrum), with an offset."""
    basis = rng.normal(size=(rank, h)) * np.array([6.0, 3.0, 1.5][:rank])[:, None]
    return np.stack([rng.normal(size=(i, rank)) @ basis + 0.4 * rng.normal(size=(i, h)) + mean for _ in range(e)])


def full_svd_pca(x, k):
    z = (x - x.mean(axis=0)) / np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
    pca = PCA(n_components=k, svd_solver="full").fit(z)
    return pca.explained_variance_ratio_, pca.components_


def subspace_sine(a, b):
    """Largest principal-angle sine between the row spaces of a [k, d] and b [k, d]."""
    qa, _ = np.linalg.qr(a.T)
    qb, _ = np.linalg.qr(b.T)
    s = np.linalg.svd(qa.T @ qb, compute_uv=False)
    return float(np.sqrt(max(0.0, 1.0 - s.min() ** 2)))


@pytest.mark.parametrize("kind", ["up", "down"])
@pytest.mark.parametrize("as_bf16", [False, True])
def test_randomized_neuron_pca_matches_full_svd(kind, as_bf16):
    rng = np.random.default_rng(0)
    w = structured_stack(rng)
    if kind == "down":
        w = np.ascontiguousarray(np.transpose(w, (0, 2, 1)))
    stack = torch.tensor(w).to(torch.bfloat16) if as_bf16 else w
    rows = np.concatenate(
        [np.asarray(torch.as_tensor(stack[e]).double()) if as_bf16 else stack[e] for e in range(w.shape[0])],
        axis=0 if kind == "up" else 1,
    )
    rows = rows if kind == "up" else rows.T
    ratio, comps = full_svd_pca(rows, 2)
    proj = neuron_pca(stack, kind, method="randomized", power_iterations=2)
    assert proj.method == "randomized" and proj.coords.shape == (rows.shape[0], 2)
    np.testing.assert_allclose(proj.explained_variance_ratio, ratio, rtol=1e-4)
    # principal subspace: regress the randomized coordinates on the standardised data
    z = (rows - rows.mean(0)) / np.where(rows.std(0) > 0, rows.std(0), 1.0)
    dirs = np.linalg.lstsq(z, proj.coords, rcond=None)[0].T
    assert subspace_sine(dirs, comps) < 1e-3
    # coordinates equal sklearn's up to the shared sign convention
    exact = M.pca_projection(rows, method="sklearn")
    np.testing.assert_allclose(proj.coords, exact.coords, atol=1e-3 * np.abs(exact.coords).max())


def test_randomized_pca_as_the_notebooks_run_it():
    """The defaults obs1 uses (one power iteration, an 8-column sketch): explained variance to
    1e-6 of the full SVD and the principal plane within 0.3 degrees on this decaying spectrum
    (sines measured here: 2.7e-3 with 8 columns, 1.2e-3 with 12; two power iterations: 2e-6)."""
    rng = np.random.default_rng(0)
    w = structured_stack(rng)
    rows = np.concatenate(list(w), axis=0)
    ratio, comps = full_svd_pca(rows, 2)
    proj = neuron_pca(w, "up", method="randomized")
    np.testing.assert_allclose(proj.explained_variance_ratio, ratio, rtol=1e-6)
    z = (rows - rows.mean(0)) / rows.std(0)
    dirs = np.linalg.lstsq(z, proj.coords, rcond=None)[0].T
    assert subspace_sine(dirs, comps) < np.sin(np.radians(0.3))


def test_randomized_pca_without_power_iterations_is_worse_but_close():
    rng = np.random.default_rng(1)
    w = structured_stack(rng, rank=3)
    rows = w.reshape(-1, w.shape[-1])
    ratio, _ = full_svd_pca(rows, 2)
    r0 = randomized_neuron_pca([(w[e], 0) for e in range(len(w))], 2, power_iterations=0)[2]
    r2 = randomized_neuron_pca([(w[e], 0) for e in range(len(w))], 2, power_iterations=2)[2]
    assert np.abs(r2 - ratio).max() <= np.abs(r0 - ratio).max()
    np.testing.assert_allclose(r0, ratio, rtol=0.05)


def test_randomized_pca_small_blocks_equal_one_block():
    rng = np.random.default_rng(2)
    w = structured_stack(rng, e=3, i=100, h=20)
    sources = [(w[e], 0) for e in range(3)]
    one = randomized_neuron_pca(sources, 2)
    many = randomized_neuron_pca(sources, 2, block_elements=7 * 20)
    # the same up to float32 rounding of the thin products (the feature shift is taken per first block)
    np.testing.assert_allclose(many[0], one[0], rtol=1e-5, atol=1e-6 * np.abs(one[0]).max())
    np.testing.assert_allclose(many[2], one[2], rtol=1e-6)


@pytest.mark.parametrize("axis", [0, 1])
def test_flattened_grams_match_naive(axis):
    rng = np.random.default_rng(3)
    mats = [rng.normal(size=(30, 11)) + 0.5 * e for e in range(5)]
    mats[2][:, 3] = mats[0][:, 3]  # some equal elements, never a constant column
    raw, std = flattened_grams(mats, axis, block_elements=4 * 11)  # many blocks
    flat = np.stack([m.reshape(-1) for m in mats])
    np.testing.assert_allclose(raw, flat @ flat.T, rtol=1e-12)
    z = (flat - flat.mean(0)) / np.where(flat.std(0, ddof=1) > 0, flat.std(0, ddof=1), 1.0)
    np.testing.assert_allclose(std, z @ z.T, rtol=1e-10, atol=1e-9)
    proj = matrix_pca_from_gram(std, 2, [str(i) for i in range(5)])
    ref = M.pca_projection(flat, method="sklearn")
    np.testing.assert_allclose(proj.coords, ref.coords, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(proj.explained_variance_ratio, ref.explained_variance_ratio, rtol=1e-10)


def test_matrix_pca_large_route_needs_no_float64_copy():
    rng = np.random.default_rng(4)
    w = torch.tensor(structured_stack(rng, e=4, i=64, h=16)).to(torch.bfloat16)
    gram_route = M.matrix_pca(w, method="gram")
    exact = M.matrix_pca(w.double(), method="sklearn")
    np.testing.assert_allclose(gram_route.coords, exact.coords, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["up", "down"])
def test_blocked_cosine_matches_naive(kind):
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(70, 9)), rng.normal(size=(70, 9))
    a[4] = 0.0
    if kind == "down":
        a, b = a.T.copy(), b.T.copy()
    got = neuron_cosine_matrix(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), kind)
    na, nb = (a, b) if kind == "up" else (a.T, b.T)
    ref = M.cosine_between(na, nb)
    np.testing.assert_allclose(got, ref, atol=1e-6)  # NaN where a neuron is zero, in both
    assert np.isnan(got[4]).all()


def _old_reorder(a: np.ndarray, b: np.ndarray):
    """The float64 algorithm the project used before: full cosine matrix, maximize=True."""
    sim = M.cosine_between(a, b)
    rows, perm = linear_sum_assignment(sim, maximize=True)
    perm = perm[np.argsort(rows)]
    return perm, kendalltau(perm, np.arange(len(perm))).statistic, M.cosine(a, b), M.cosine(a, b[perm])


@pytest.mark.parametrize("kind", ["up", "down"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_reordering_identical_to_the_float64_algorithm(kind, dtype):
    rng = np.random.default_rng(6)
    a = rng.normal(size=(80, 24))
    b = a[rng.permutation(80)] * 0.8 + 0.6 * rng.normal(size=(80, 24))
    ta, tb = torch.tensor(a).to(dtype), torch.tensor(b).to(dtype)
    if kind == "down":
        ta, tb = ta.T.contiguous(), tb.T.contiguous()
    res = reorder_neurons(ta, tb, kind)
    na, nb = (ta, tb) if kind == "up" else (ta.T, tb.T)
    perm, tau, before, after = _old_reorder(na.double().numpy(), nb.double().numpy())
    np.testing.assert_array_equal(res.perm, perm)
    assert res.tau == pytest.approx(tau, abs=1e-12)
    assert res.sim_before == pytest.approx(before, abs=1e-12 if dtype != torch.float32 else 1e-7)
    assert res.sim_after == pytest.approx(after, abs=1e-6)


def test_reordering_does_not_modify_its_inputs():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(20, 6)), rng.normal(size=(20, 6))
    a0, b0 = a.copy(), b.copy()
    reorder_neurons(a, b, "up")
    neuron_pca(np.stack([a, b]), "up", method="randomized")
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)


def test_reordering_workers_two_equal_one(tmp_path):
    model = tiny("mixtral")
    one = static.reordering(model, max_pairs=3, seed=1, workers=1)
    two = static.reordering(model, max_pairs=3, seed=1, workers=2)
    assert len(one) == 3 * 3 * len(model.moe_layers)  # 3 pairs of each of the 3 matrices per layer
    assert one.equals(two)


def test_reorder_max_pairs_zero_skips():
    report = static.weight_report(tiny("mixtral"), reorder_max_pairs=0)
    assert report["reordering"].empty and list(report["reordering"].columns) == static.REORDER_COLUMNS
    assert not report["similarity"].empty


def test_weight_report_stats_equal_the_single_metrics():
    model = tiny("mixtral")
    report = static.weight_report(model, reorder_max_pairs=0)
    layer = model.moe_layers[0]
    w = layer_weights(model, layer)
    sim = report["similarity"]
    got = sim[(sim.layer == layer) & (sim.matrix == "W_up") & (sim.level == "matrix")].similarity.to_numpy()
    np.testing.assert_allclose(got.reshape(w.num_experts, -1), M.matrix_level_similarity(w.w_up), atol=1e-6)
    pm = report["pca_matrix"]
    ref = M.matrix_pca(w.w_up, method="sklearn")
    np.testing.assert_allclose(
        pm[(pm.layer == layer) & (pm.matrix == "W_up")][["pc1", "pc2"]].to_numpy(),
        ref.coords,
        atol=1e-4 * np.abs(ref.coords).max(),
    )


def test_chunked_intermediates_equal_the_whole_tensor():
    model = tiny("mixtral")
    w = layer_weights(model, model.moe_layers[0])
    x = torch.randn(37, w.hidden_size)
    full = expert_intermediates(w, x, chunk_tokens=8)
    for e, inter in iter_expert_intermediates(w, x, chunk_tokens=5):
        torch.testing.assert_close(inter, full[:, e])
    torch.testing.assert_close(expert_intermediates(w, x, max_neurons=3), full[..., :3])
    torch.testing.assert_close(expert_intermediates(w, x, experts=[2, 0]), full[:, [2, 0]])


def test_activation_ratios_per_expert_equal_the_whole_tensor():
    from moe_utils.analysis import dynamic

    model = tiny("mixtral")

    layer = model.moe_layers[0]

    class Lt:
        x = torch.randn(29, model.config.hidden_size)

    class Tr:
        layers = [layer]
        per_layer = {layer: Lt()}

    got = dynamic.activation_ratios(model, Tr())
    ref = M.activation_ratio(expert_intermediates(layer_weights(model, layer), Lt.x)).per_expert
    np.testing.assert_allclose(got.ratio.to_numpy(), ref, rtol=1e-12)


def test_file_reads_equal_the_memory_map(tmp_path):
    from safetensors.torch import save_file

    tensors = {
        "a": torch.randn(5, 7).to(torch.bfloat16),
        "b": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "c": torch.randn(3),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    for name, t in tensors.items():
        got = reader.read(name)
        assert got.dtype == t.dtype and torch.equal(got, t) and torch.equal(got, reader.get(name))


def test_progress_goes_to_the_named_file(tmp_path, monkeypatch):
    log = tmp_path / "progress.log"
    monkeypatch.setenv(PROGRESS_ENV, str(log))
    monkeypatch.setenv("TQDM_DISABLE", "1")  # book runs switch other bars off
    for _ in progress(range(3), desc="layers"):
        pass
    text = log.read_text()
    assert "layers" in text and "3/3" in text


def test_relay_copies_appended_text(tmp_path):
    log, out = tmp_path / "p.log", io.StringIO()
    with relay(log, out, interval=0.01):
        with open(log, "a") as f:
            f.write("layer 0: 1/2\r")
            f.flush()
        time.sleep(0.1)
    assert "layer 0: 1/2" in out.getvalue()


@pytest.mark.slow
def test_book_runs_show_progress_on_the_terminal_not_in_the_page(tmp_path, capfd):
    import nbformat

    from moe_utils.publish.pages import discover_notebooks
    from moe_utils.publish.plan import plan_jobs
    from moe_utils.publish.runner import run_notebooks

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["moe_book"] = {"scope": "model"}
    nb.cells = [
        nbformat.v4.new_code_cell('model = "zoo:x"\nresults_dir = "results"', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "from moe_utils.core.progress import progress\n"
            "for _ in progress(range(4), desc='demo-pass', unit='layer'):\n"
            "    pass\nprint('cell done')"
        ),
    ]
    (tmp_path / "nbs").mkdir()
    nbformat.write(nb, tmp_path / "nbs" / "obs9_bars.ipynb")
    jobs = plan_jobs(discover_notebooks(tmp_path / "nbs"), ["zoo:tiny"], None, tmp_path / "runs")
    run_notebooks(jobs, log=print, root=tmp_path)
    saved = nbformat.read(tmp_path / "runs" / "tiny" / "obs9_bars.ipynb", as_version=4)
    outputs = json.dumps([c.get("outputs", []) for c in saved.cells])
    assert "cell done" in outputs and "demo-pass" not in outputs
    err = capfd.readouterr().err
    assert "demo-pass" in err and "4/4" in err


@pytest.mark.parametrize("axis", [0, 1])
def test_fused_pass_gives_the_randomized_pca_first_pass_and_the_neuron_averages(axis):
    """One conversion per element: the sketch and neuron sums of flattened_pass equal the
    separate computations (randomized PCA from scratch, neuron_average), for bf16 inputs."""
    rng = np.random.default_rng(5)
    w = structured_stack(rng, e=4, i=90, h=24)
    if axis == 1:
        w = np.ascontiguousarray(np.transpose(w, (0, 2, 1)))
    stack = torch.tensor(w).to(torch.bfloat16)
    mats = [stack[e] for e in range(len(stack))]
    n_rows, d = len(mats) * int(w.shape[1 + axis]), int(w.shape[2 - axis])
    omega = sketch_matrix(d, sketch_width(n_rows, d, 2), seed=3)
    res = flattened_pass(mats, axis, omega=omega, block_elements=4 * 24 * 7)  # many blocks
    kind = "up" if axis == 0 else "down"
    np.testing.assert_allclose(res.neuron_sums / w.shape[1 + axis], M.neuron_average(stack, kind), rtol=1e-5, atol=1e-6)
    sources = [(m, axis) for m in mats]
    fused = randomized_neuron_pca(sources, 2, seed=3, first_pass=res.sketch)
    alone = randomized_neuron_pca(sources, 2, seed=3)
    np.testing.assert_allclose(fused[2], alone[2], rtol=1e-5)
    np.testing.assert_allclose(np.abs(fused[0]), np.abs(alone[0]), rtol=1e-4, atol=1e-5 * np.abs(alone[0]).max())
    raw, std = flattened_grams(mats, axis)
    np.testing.assert_allclose(res.gram, raw, rtol=1e-5)  # other block sizes: float32 rounding
    np.testing.assert_allclose(res.std_gram, std, rtol=1e-5, atol=1e-5 * np.abs(std).max())
    with pytest.raises(ValueError, match="sketch matrix needs"):
        flattened_pass(mats, axis, omega=sketch_matrix(d + 1, 12))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_neuron_blocks_of_columns_equal_the_transpose(dtype):
    """W_down's neurons are columns: the stored-layout blocks (views into one buffer) and the
    fresh C-contiguous rows both equal the plain transpose."""
    m = torch.randn(13, 37, dtype=torch.float64).to(dtype)
    ref = m.double().numpy().T
    got = np.concatenate([x.copy() for _, x in neuron_blocks(m, 1, block_elements=13 * 5)])
    np.testing.assert_array_equal(got, ref.astype(got.dtype))
    rows = neuron_rows(m, 1, 3, 30)
    assert rows.flags["C_CONTIGUOUS"] and rows.dtype == (np.float64 if dtype == torch.float64 else np.float32)
    np.testing.assert_array_equal(rows, ref[3:30].astype(rows.dtype))


def test_weight_report_uses_the_fused_first_pass(monkeypatch):
    """With the randomized neuron PCA forced on (a tiny model above a lowered threshold),
    weight_report's neuron coordinates equal neuron_pca's own streamed computation."""
    monkeypatch.setattr(projection, "SKLEARN_MAX_ELEMENTS", 10)
    model = tiny("mixtral")
    report = static.weight_report(model, reorder_max_pairs=0, max_neurons_per_expert=10**6)
    layer = model.moe_layers[0]
    w = layer_weights(model, layer)
    for m, kind, stack in (("W_up", "up", w.w_up), ("W_down", "down", w.w_down)):
        ref = neuron_pca(stack, kind)
        assert ref.method == "randomized"
        pn = report["pca_neuron"]
        got = pn[(pn.layer == layer) & (pn.matrix == m)][["pc1", "pc2"]].to_numpy()
        np.testing.assert_allclose(got, ref.coords, rtol=1e-4, atol=1e-5 * np.abs(ref.coords).max())


def test_split_ranges_cover_the_range_on_step_boundaries():
    from moe_utils.metrics.threads import split_range

    for total, parts, step in [(10, 3, 1), (100, 4, 7), (5, 8, 1), (1, 2, 4), (64, 2, 16)]:
        ranges = split_range(total, parts, step)
        assert ranges[0][0] == 0 and ranges[-1][1] == total and len(ranges) <= parts
        assert all(b1 == a2 for (_, b1), (a2, _) in zip(ranges, ranges[1:], strict=False))
        assert all(a % step == 0 for a, _ in ranges)


@pytest.mark.parametrize("axis", [0, 1])
def test_threaded_passes_equal_one_thread(axis):
    """Splitting the neurons between threads changes only the order of float64 sums."""
    rng = np.random.default_rng(8)
    w = structured_stack(rng, e=4, i=120, h=24)
    if axis == 1:
        w = np.ascontiguousarray(np.transpose(w, (0, 2, 1)))
    mats = [torch.tensor(w[e]).to(torch.bfloat16) for e in range(len(w))]
    n_rows, d = len(mats) * int(w.shape[1 + axis]), int(w.shape[2 - axis])
    omega = sketch_matrix(d, sketch_width(n_rows, d, 2), seed=1)
    one = flattened_pass(mats, axis, omega=omega, block_elements=4 * 24 * 5, threads=1)
    three = flattened_pass(mats, axis, omega=omega, block_elements=4 * 24 * 5, threads=3)
    for a, b in [(one.gram, three.gram), (one.std_gram, three.std_gram), (one.neuron_sums, three.neuron_sums)]:
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(a).max())
    assert one.sketch is not None and three.sketch is not None
    np.testing.assert_array_equal(one.sketch.y, three.sketch.y)  # rows are computed the same way
    np.testing.assert_allclose(one.sketch.xty, three.sketch.xty, rtol=1e-10, atol=1e-10 * np.abs(one.sketch.xty).max())
    sources = [(m, axis) for m in mats]
    p1 = randomized_neuron_pca(sources, 2, block_elements=24 * 9, threads=1)
    p3 = randomized_neuron_pca(sources, 2, block_elements=24 * 9, threads=3)
    np.testing.assert_allclose(p1[2], p3[2], rtol=1e-9)
    np.testing.assert_allclose(p1[0], p3[0], rtol=1e-7, atol=1e-9 * np.abs(p1[0]).max())


def test_sketch_width_is_a_multiple_of_eight_within_the_matrix():
    from moe_utils.metrics.projection import OVERSAMPLE, sketch_width

    assert sketch_width(10_000, 4096, 2) == 8 >= 2 + OVERSAMPLE
    assert sketch_width(10_000, 4096, 4) == 16  # 4 + 5 rounded up
    assert sketch_width(10_000, 4096, 2, oversample=0) == 8
    assert sketch_width(6, 4096, 2) == 6 and sketch_width(10_000, 5, 2) == 5  # capped by the matrix
