"""The organism study's numbers: per-replicate results files and the book-level replication tables.

Per replicate (``moe-book zoo study --run/--measure``) two results files are written:
``study_replicate.json`` (tables ``verdicts``, ``heldout``, ``training``) and, for replicates with
training snapshots, ``study_emergence.json`` (table ``emergence``). The shipped copies live in
``moe_utils/zoo/study/NAME/``; :func:`replication_tables` turns them into ``replication.json``.

Across seeds (the rule of the pre-registration page): each seed contributes its effect (observed
minus its computed null) and standard error; they are combined by random-effects meta-analysis
(:func:`moe_utils.metrics.random_effects`: DerSimonian-Laird between-seed variance, modified
Hartung-Knapp interval with seeds - 1 degrees of freedom) and the combined interval is judged
with the claim's floor (:func:`moe_utils.metrics.outcome`). Seeds whose results predate the
nulls (no standard error) are not combined and are counted in ``seeds_pending``; fewer than two
combinable seeds give an undefined verdict, never a vote. The ladder's replicates (other depths
or training lengths) are kept out of the across-seed rows and go to the ``ladder`` table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
from scipy import stats

from moe_utils import metrics as M
from moe_utils.analysis import headlines as H
from moe_utils.analysis import paper, static
from moe_utils.analysis.claims import CLAIMS, issued_claims
from moe_utils.analysis.context import checkpoint_only, open_study
from moe_utils.analysis.interventions import PLACEMENT_LAST_LAYER_FLOOR, PLACEMENT_TREND_FLOOR
from moe_utils.analysis.results import iter_results, read_result, write_result
from moe_utils.arch.config import read_config_json
from moe_utils.core.errors import MoEUtilsError
from moe_utils.core.frames import int_key
from moe_utils.core.paths import ZOO_STUDY_DIR, zoo_path
from moe_utils.models.checkpoint import find_weight_files
from moe_utils.models.fingerprint import checkpoint_fingerprint
from moe_utils.zoo.evaluate import load_windows, model_nll, perplexity
from moe_utils.zoo.replicates import REPLICATES, Replicate, replicate_dir, snapshot_dir

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
UNDEFINED = "undefined"
INPUTS = "long"  # the observation notebooks' default input


def model_folder(rep: Replicate, out: Path | None) -> Path:
    """The trained weights of a replicate: its study folder, else the shipped organism."""
    if out is not None:
        folder = replicate_dir(out, rep.name) / "model"
        if (folder / "model.safetensors").exists():
            return folder
    if rep.shipped_as:
        return zoo_path(rep.shipped_as)
    raise FileNotFoundError(f"{rep.name} has no trained weights; train it with 'moe-book zoo study --run {rep.name}'")


# ----------------------------------------------------------------------------- measuring


def _open(folder: Path):
    import tempfile

    return open_study(str(folder), None, results_dir=Path(tempfile.gettempdir()) / "moe-book-study")


def measure_model(folder: Path, seed: int = 0) -> tuple[list[dict], dict[str, float], Any]:
    """Headline rows of observations 1-3 for the model in ``folder``, extras, and its long trace."""
    study = _open(folder)
    long_trace = study.trace(study.inputs(INPUTS))
    o1 = H.observation1(checkpoint_only(str(folder)), None, seed=seed)
    o2 = H.observation2(study.lm, long_trace, seed=seed)
    o3, extra = H.observation3(study.lm, long_trace, seed=seed)
    return [h.as_row() for h in (o1, o2, *o3)], extra, long_trace


EMERGENCE_WINDOWS = 120  # held-out windows for snapshot losses (the organisms page's evenly spaced sample)


def heldout(folder: Path, max_windows: int | None = None) -> dict[str, float]:
    """Held-out loss of the stored (bf16) weights loaded in float32, on every held-out window (as the
    zoo cards report) or on an evenly spaced sample of ``max_windows``."""
    import torch
    from transformers import AutoModelForCausalLM

    windows = load_windows(max_windows=max_windows)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    nll = model_nll(model, windows)
    return {
        "heldout_loss": nll,
        "heldout_perplexity": perplexity(nll),
        "heldout_tokens": int(sum(len(w) - 1 for w in windows)),
        "heldout_windows": len(windows),
    }


def _training_row(rep: Replicate, folder: Path) -> dict[str, Any]:
    log_path = folder / "training_log.json"
    info = json.loads(log_path.read_text()) if log_path.exists() else {}
    return {
        "steps": rep.spec.steps,
        "tokens": rep.spec.tokens,
        "train_seed": rep.spec.seed,
        "training_seconds": info.get("training_seconds"),
        "torch_threads": info.get("torch_threads"),
        "torch_version": info.get("torch_version"),
    }


def write_replicate_results(rep: Replicate, out: Path, log=print) -> list[Path]:
    """Measure a trained replicate (and its snapshots) and write its results files."""
    folder = model_folder(rep, out)
    rdir = replicate_dir(out, rep.name) / "results"
    base = {
        "organism": rep.organism,
        "kind": rep.kind,
        "seed": rep.seed_index,
        "layers": rep.layers or 8,
        "steps": rep.spec.steps,
        "ladder": rep.ladder or "",
    }
    ho = heldout(folder)
    paths = []
    tables: dict[str, pd.DataFrame] = {"heldout": pd.DataFrame([{**base, **ho, "dense_layer": rep.dense_layer}])}
    train_src = (
        replicate_dir(out, rep.name) if (replicate_dir(out, rep.name) / "training_log.json").exists() else folder
    )
    tables["training"] = pd.DataFrame([{**base, **_training_row(rep, train_src)}])
    final_trace = None
    if rep.is_moe and rep.kind != "placement":
        rows, extra, final_trace = measure_model(folder)
        tables["verdicts"] = pd.DataFrame([{**base, **r} for r in rows])
        tables["depth_details"] = pd.DataFrame([{**base, **extra}])
    params = {"replicate": rep.name, "inputs": INPUTS, "train_spec": rep.spec.as_dict(), "weights": str(folder.name)}
    summary = {
        "heldout_loss": {
            "value": ho["heldout_loss"],
            "ci_low": None,
            "ci_high": None,
            "baseline": None,
            "verdict": None,
            "paper": {},
            "note": f"{ho['heldout_tokens']} held-out tokens",
        }
    }
    paths.append(write_result(rdir, "study_replicate", rep.name, _fingerprint(folder), params, tables, summary))
    missing = [s for s in rep.snapshots if not (snapshot_dir(out, rep.name, s) / "config.json").exists()]
    if rep.snapshots and missing:
        log(f"{rep.name}: snapshots {missing} are not in {out}; its emergence results are left as they are")
    elif rep.snapshots:
        if final_trace is None:
            raise MoEUtilsError(
                f"{rep.name}: snapshots are compared with the final model's trace, which only MoE replicates have"
            )
        rows = []
        for step in rep.snapshots:
            sdir = snapshot_dir(out, rep.name, step)
            log(f"{rep.name}: measuring snapshot at step {step}")
            hrows, extra, tr = measure_model(sdir)
            nan = float("nan")
            vals: dict[str, tuple[float, float, float]] = {
                "heldout_loss_sample": (heldout(sdir, EMERGENCE_WINDOWS)["heldout_loss"], nan, nan),
                **{r["quantity"]: (r["effect"], r["ci_low"], r["ci_high"]) for r in hrows},
                "trend_rho": (extra["trend_rho"], nan, nan),
                "mean_output_similarity": (extra["mean_output_similarity"], nan, nan),
                "router_saturation": (H.router_saturation(tr, final_trace), nan, nan),
            }
            if rep.kind == "upcycled":
                vals["expert_matrix_similarity"] = (expert_matrix_similarity(sdir), nan, nan)
            for q, (v, lo, hi) in vals.items():
                rows.append(
                    {
                        "organism": rep.organism,
                        "kind": rep.kind,
                        "seed": rep.seed_index,
                        "step": step,
                        "tokens_seen": step * rep.spec.tokens_per_step,
                        "quantity": q,
                        "value": v,
                        "ci_low": lo,
                        "ci_high": hi,
                    }
                )
        paths.append(
            write_result(
                rdir, "study_emergence", rep.name, _fingerprint(folder), params, {"emergence": pd.DataFrame(rows)}, {}
            )
        )
    for p in paths:
        log(f"wrote {p}")
    return paths


def expert_matrix_similarity(folder: Path) -> float:
    """Mean matrix-level cosine between distinct experts over layers and matrices (the paper's
    App. D quantity, about 0.2-0.4 for Mixtral), read from the checkpoint one layer at a time."""
    sim = static.offdiagonal_summary(static.weight_similarity(checkpoint_only(str(folder)), None, None))
    return float(sim.loc[sim.level == "matrix", "S_ee"].mean()) if "S_ee" in sim else float("nan")


def _fingerprint(folder: Path) -> str:
    return checkpoint_fingerprint(read_config_json(folder), find_weight_files(folder))


# ----------------------------------------------------------------------------- collecting


def load_shipped(root: Path | None = None) -> dict[str, dict[str, pd.DataFrame]]:
    """Every shipped replicate's tables, by replicate name (replicates without results are absent)."""
    root = ZOO_STUDY_DIR if root is None else Path(root)
    out: dict[str, dict[str, pd.DataFrame]] = {}
    # the shipped layout (NAME/study_*.json) or a study folder's (NAME/results/study_*.json)
    for pattern in ("*/study_replicate.json", "*/results/study_replicate.json"):
        for res in iter_results(root, pattern):
            assert res.path is not None
            tables = dict(res.tables)
            em = res.path.with_name("study_emergence.json")
            if em.exists():
                tables.update(read_result(em).tables)
            folder = res.path.parent
            out[folder.parent.name if folder.name == "results" else folder.name] = tables
    return out


def _tag_run(name: str, frame: pd.DataFrame | None) -> pd.DataFrame | None:
    """A replicate's emergence rows labelled with the run they come from (name, ladder axis and
    run length): a 4x run and an organism replicate can share a kind and a seed."""
    if frame is None or not len(frame):
        return frame
    rep = REPLICATES.get(name)
    return frame.assign(
        replicate=name, ladder=(rep.ladder or "") if rep else "", run_steps=rep.spec.steps if rep else float("nan")
    )


def _concat(frames: Iterable[pd.DataFrame | None]) -> pd.DataFrame:
    frames = [f for f in frames if f is not None and len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval of the mean over independent replicates (NaN for n < 2)."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, m - half, m + half


def _claim_rows(verdicts: pd.DataFrame) -> pd.DataFrame:
    """Verdict rows measured with the nulls (they name a claim), ladder replicates left out."""
    if not len(verdicts) or "claim" not in verdicts:
        return pd.DataFrame(columns=["organism", "seed", "claim", "observation", "effect", "se", "null", "verdict"])
    v = verdicts.dropna(subset=["claim"])
    if "ladder" in v:
        v = v[v.ladder.fillna("") == ""]
    return cast(pd.DataFrame, v)


def _combine(measured: pd.DataFrame, org: str, key: str) -> tuple[M.Combined, pd.DataFrame]:
    g = cast(pd.DataFrame, measured[(measured.organism == org) & (measured.claim == key)]).sort_values(by="seed")
    return M.random_effects(g.effect.astype(float).to_numpy(), g.se.astype(float).to_numpy()), g


def _judge_combined(key: str, comb: M.Combined) -> str:
    claim = CLAIMS[key]
    low, high = (comb.low, comb.high) if claim.direction > 0 else (-comb.high, -comb.low)
    if claim.kind == "noninferior":
        return M.noninferior_outcome(low, high, claim.floor)
    return M.outcome(low, high, claim.floor)


def across_seed_rows(verdicts: pd.DataFrame, pending: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per organism kind and issued claim: the random-effects combination of its seeds."""
    if not len(verdicts):
        return pd.DataFrame()
    measured = _claim_rows(verdicts)
    base = verdicts[verdicts.ladder.fillna("") == ""] if "ladder" in verdicts else verdicts
    seeds_all = base.groupby("organism").seed.nunique()
    if pending is not None and len(pending):
        extra = pending.groupby("organism").seed.nunique()
        seeds_all = seeds_all.add(extra, fill_value=0).astype(int)
    rows = []
    for claim in issued_claims():
        for org in sorted(base.organism.unique()):
            comb, g = _combine(measured, org, claim.key)
            if claim.kind == "composite":
                parts = [_judge_combined(k, _combine(measured, org, k)[0]) for k in ("obs3_slope", "obs3_residual")]
                verdict = M.combine_outcomes(*parts)
                slope = _combine(measured, org, "obs3_slope")[0]
                note = (
                    f"slope {slope.estimate:+.4f} [{slope.low:+.4f}, {slope.high:+.4f}] ({parts[0]}); "
                    f"residual ({parts[1]})"
                )
            else:
                verdict = _judge_combined(claim.key, comb)
                note = ""
            n_pending = int(seeds_all.get(org, 0)) - comb.seeds
            if comb.seeds < 2:
                note = f"{comb.seeds} seed(s) measured with the nulls, {n_pending} pending: no across-seed verdict"
            p = comb.p_greater if claim.direction > 0 else 1 - comb.p_greater
            rows.append(
                {
                    "organism": org,
                    "observation": claim.observation,
                    "claim": claim.key,
                    "quantity": claim.quantity,
                    "seeds": comb.seeds,
                    "seeds_pending": n_pending,
                    "effect": comb.estimate,
                    "se": comb.se,
                    "ci_low": comb.low,
                    "ci_high": comb.high,
                    "between_seed_sd": comb.tau,
                    "null": float(g.null.astype(float).mean()) if len(g) else float("nan"),
                    "floor": claim.floor,
                    "p_value": p,
                    "power": M.power_to_hold(claim.paper_effect, claim.floor, comb.se, max(1, comb.seeds - 1)),
                    "seed_effects": ", ".join(f"{x:+.3f}" for x in g.effect.astype(float)),
                    "seed_verdicts": ", ".join(g.verdict.astype(str)),
                    "verdict": verdict,
                    "note": note,
                }
            )
    out = pd.DataFrame(rows)
    out["p_holm"] = M.holm(out.p_value.to_numpy(dtype=float))
    return out


LADDER_COLUMNS = [
    "kind",
    "layers",
    "steps",
    "seed",
    "observation",
    "claim",
    "effect",
    "null",
    "ci_low",
    "ci_high",
    "floor",
    "outcome",
]


def ladder_table(verdicts: pd.DataFrame) -> pd.DataFrame:
    """The ``ladder`` table: every replicate measured with the nulls, with its depth and length."""
    v = verdicts.dropna(subset=["claim"]) if "claim" in verdicts else verdicts.iloc[0:0]
    if not len(v):
        return pd.DataFrame(columns=LADDER_COLUMNS)
    v = v.assign(outcome=v.verdict)
    return (
        cast(pd.DataFrame, v[LADDER_COLUMNS])
        .sort_values(by=["kind", "layers", "steps", "seed", "observation"])
        .reset_index(drop=True)
    )


LADDER_ACROSS_COLUMNS = ["kind", "layers", "steps", "claim", "seeds", "effect", "ci_low", "ci_high", "floor", "outcome"]


def rung_outcome(g: pd.DataFrame, key: str) -> tuple[M.Combined, str]:
    """The random-effects combination of one claim over the seeds of one rung, and its outcome
    (a composite claim is judged from its two parts, as on the organisms' pages)."""
    claim = CLAIMS[key]
    if claim.kind == "composite":
        parts = ("obs3_slope", "obs3_residual")
        judged = [rung_outcome(g, k)[1] for k in parts]
        sub = cast(pd.DataFrame, g[g.claim == "obs3_residual"]).sort_values(by="seed")
        comb = M.random_effects(sub.effect.astype(float).to_numpy(), sub.se.astype(float).to_numpy())
        return comb, M.combine_outcomes(*judged) if comb.seeds >= 2 else "undefined"
    sub = cast(pd.DataFrame, g[g.claim == key]).sort_values(by="seed")
    comb = M.random_effects(sub.effect.astype(float).to_numpy(), sub.se.astype(float).to_numpy())
    return comb, _judge_combined(key, comb) if comb.seeds >= 2 else "undefined"


def ladder_across_seeds(verdicts: pd.DataFrame) -> pd.DataFrame:
    """One row per rung (kind, layers, steps) and issued claim: its seeds combined by random
    effects, judged like the organisms' across-seed verdicts; "undefined" below two seeds."""
    v = verdicts.dropna(subset=["claim"]) if "claim" in verdicts else verdicts.iloc[0:0]
    if not len(v) or "se" not in v:
        return pd.DataFrame(columns=LADDER_ACROSS_COLUMNS)
    rows = []
    for key, g in v.groupby(["kind", "layers", "steps"], sort=True):
        kind, layers, steps = cast(tuple, key)
        for claim in issued_claims():
            comb, outcome = rung_outcome(cast(pd.DataFrame, g), claim.key)
            rows.append(
                {
                    "kind": kind,
                    "layers": int(layers),
                    "steps": int(steps),
                    "claim": claim.key,
                    "seeds": comb.seeds,
                    "effect": comb.estimate,
                    "ci_low": comb.low,
                    "ci_high": comb.high,
                    "floor": claim.floor,
                    "outcome": outcome,
                }
            )
    return pd.DataFrame(rows, columns=LADDER_ACROSS_COLUMNS)


def pending_table(verdicts: pd.DataFrame) -> pd.DataFrame:
    """Replicates whose shipped verdict rows predate the nulls: (organism, seed, reason). Their old
    verdicts are not shown or combined; retraining them re-measures them."""
    cols = ["organism", "seed", "reason"]
    if not len(verdicts):
        return pd.DataFrame(columns=cols)
    old = verdicts[verdicts["claim"].isna()] if "claim" in verdicts else verdicts
    rows = cast(pd.DataFrame, old[["organism", "seed"]]).drop_duplicates().sort_values(by=["organism", "seed"])
    out = rows.assign(
        reason="measured before the nulls; its weights do not ship: 'moe-book zoo study --run' retrains it bit for bit"
    )
    return cast(pd.DataFrame, out[cols]).reset_index(drop=True)


def replication_tables(shipped: dict[str, dict[str, pd.DataFrame]]) -> dict[str, pd.DataFrame]:
    """``verdicts``, ``emergence``, ``across_seeds`` and ``heldout`` tables of replication.json."""
    verdicts = _concat(t.get("verdicts") for t in shipped.values())
    emergence = _concat(_tag_run(name, t.get("emergence")) for name, t in shipped.items())
    held = _concat(t.get("heldout") for t in shipped.values())
    training = _concat(t.get("training") for t in shipped.values())
    measured = verdicts.dropna(subset=["claim"]) if "claim" in verdicts else verdicts.iloc[0:0]
    return {
        "verdicts": measured,
        "pending": pending_table(verdicts),
        "emergence": emergence,
        "across_seeds": across_seed_rows(measured, pending_table(verdicts)),
        "ladder": ladder_table(verdicts),
        "ladder_across_seeds": ladder_across_seeds(measured),
        "heldout": held,
        "training": training,
    }


def list_table(rows: list[dict], shipped: dict[str, dict[str, pd.DataFrame]] | None = None) -> pd.DataFrame:
    """``zoo study --list``: the replicates with their measured training cost where results ship."""
    shipped = load_shipped() if shipped is None else shipped
    df = pd.DataFrame(rows)
    cost = {}
    for name, t in shipped.items():
        tr = t.get("training")
        if tr is not None and len(tr) and tr.training_seconds.iloc[0] is not None:
            cost[name] = float(tr.training_seconds.iloc[0]) / 60
    df["measured_minutes"] = df.name.map(lambda n: f"{cost[n]:.1f}" if n in cost else "")
    df["dense_layer"] = df.dense_layer.map(
        lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)
    )
    return df


# ----------------------------------------------------------------------------- dense-layer placement


def placement_table(shipped: dict[str, dict[str, pd.DataFrame]]) -> pd.DataFrame:
    """One row per trained placement replicate: dense_layer (None: all MoE), seed, nll, ppl."""
    rows = []
    for name, t in shipped.items():
        h = t.get("heldout")
        if h is None or not len(h) or h.kind.iloc[0] != "placement":
            continue
        dl = h.dense_layer.iloc[0]
        rows.append(
            {
                "replicate": name,
                "dense_layer": None if dl is None or pd.isna(dl) else int(dl),
                "seed": int(h.seed.iloc[0]),
                "nll": float(h.heldout_loss.iloc[0]),
                "ppl": float(h.heldout_perplexity.iloc[0]),
            }
        )
    return pd.DataFrame(rows, columns=["replicate", "dense_layer", "seed", "nll", "ppl"])


def placement_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per variant: seeds, mean NLL with a 95% t-interval over seeds, mean perplexity, and the
    mean paired-by-seed difference from the all-MoE variant of the same seed."""
    rows = []
    key = table.dense_layer.map(lambda v: -1 if v is None or pd.isna(v) else int(v))
    base = table[key == -1].set_index("seed").nll
    for k, g in table.groupby(key):
        m, lo, hi = t_interval(g.nll.tolist())
        paired = [float(n - base[s]) for s, n in zip(g.seed, g.nll, strict=True) if s in base.index]
        rows.append(
            {
                "dense_layer": None if k == -1 else int_key(k),
                "seeds": len(g),
                "nll": m,
                "ci_low": lo,
                "ci_high": hi,
                "ppl": float(np.exp(m)),
                "minus_all_moe": float(np.mean(paired)) if paired and k != -1 else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def paper_placement_trend() -> float:
    """Table 6's trend as a slope in nats: the least-squares slope of ln PPL against relative depth
    ((position - 1) / 23) over the positions before the last, 1, 6, 12 and 18 of 24 (0.014 per unit
    depth; its Bench avg falls 39.42 -> 37.99 over the same positions)."""
    last = max(k for k in paper.DENSE_LAYER_EXPERIMENT if isinstance(k, int))
    pos = np.array([k for k in paper.DENSE_LAYER_EXPERIMENT if isinstance(k, int) and k < last], dtype=float)
    nll = np.log([paper.DENSE_LAYER_EXPERIMENT[int(p)][0] for p in pos])
    return float(np.polyfit((pos - 1) / (last - 1), nll, 1)[0])


def placement_slopes(table: pd.DataFrame, num_layers: int) -> pd.DataFrame:
    """Per seed: least-squares slope of held-out NLL against relative depth (position / (layers - 1))
    over the positions before the last (the first layer included), its standard error
    (residual variance, points - 2 degrees of freedom) and the number of positions."""
    t = table.dropna(subset=["dense_layer"])
    t = t[t.dense_layer < num_layers - 1]
    rows = []
    for seed, g in t.groupby("seed"):
        x = g.dense_layer.to_numpy(dtype=float) / (num_layers - 1)
        y = g.nll.to_numpy(dtype=float)
        slope = se = float("nan")
        if len(g) >= 3 and np.ptp(x) > 0:
            slope, intercept = (float(v) for v in np.polyfit(x, y, 1))
            resid = y - (intercept + slope * x)
            se = float(np.sqrt((resid**2).sum() / (len(x) - 2) / ((x - x.mean()) ** 2).sum()))
        rows.append({"seed": int_key(seed), "slope": slope, "se": se, "positions": len(g)})
    return pd.DataFrame(rows, columns=["seed", "slope", "se", "positions"])


def placement_verdict(table: pd.DataFrame, num_layers: int) -> dict[str, Any]:
    """The paper's Table 6 trend, tested seed by seed: (a) within each seed, the least-squares slope
    of held-out NLL against relative depth over the dense positions before the last (the first
    layer included), combined over seeds by random-effects meta-analysis (Hartung-Knapp, t with
    seeds - 1 degrees of freedom); the effect is that slope (null 0), judged with the four outcomes
    against a floor of a quarter of the paper's trend, with the power of this design for a trend of
    the paper's size. (b) The last layer, judged separately and reported in the note: a dense
    layer just before the last minus a dense last layer, paired by seed (t over seeds), against a
    floor of 0.01 nats (a 1% perplexity change); the verdict of the entry is that of (a)."""
    nan = float("nan")
    last = num_layers - 1
    slopes = placement_slopes(table, num_layers)
    ok = slopes.dropna(subset=["slope", "se"])
    paper_trend = paper_placement_trend()
    base = {
        "baseline": 0.0,
        "null": 0.0,
        "floor": PLACEMENT_TREND_FLOOR,
        "interval": "per-seed slopes, random effects (Hartung-Knapp, t)",
        "paper": {},
    }
    if len(ok) < 2:
        return {
            **base,
            "value": nan,
            "ci_low": nan,
            "ci_high": nan,
            "observed": nan,
            "se": nan,
            "df": nan,
            "p_value": nan,
            "power": nan,
            "verdict": UNDEFINED,
            "note": f"{len(ok)} seed(s) with at least 3 dense positions before the last layer: no trend verdict",
        }
    comb = M.random_effects(ok.slope.tolist(), ok.se.tolist())
    df = float(comb.seeds - 1)
    verdict = M.outcome(comb.low, comb.high, PLACEMENT_TREND_FLOOR)
    power = M.power_to_hold(paper_trend, PLACEMENT_TREND_FLOOR, comb.se, df)
    t = table.dropna(subset=["dense_layer"])
    a = t[t.dense_layer == last].set_index("seed").nll
    b = t[t.dense_layer == last - 1].set_index("seed").nll
    both = a.index.intersection(b.index)
    lastiv = M.t_mean_interval((b[both] - a[both]).to_numpy(dtype=float))
    last_verdict = M.outcome(lastiv.low, lastiv.high, PLACEMENT_LAST_LAYER_FLOOR)
    seeds = ", ".join(f"{s:+.4f}" for s in ok.slope)
    note = (
        f"held-out loss against the dense layer's relative depth (positions 0-{last - 1} of {num_layers}), "
        f"per seed {seeds}; combined {comb.estimate:+.4f} [{comb.low:+.4f}, {comb.high:+.4f}] nats per unit depth "
        f"over {comb.seeds} seeds, between-seed sd {comb.tau:.4f} (floor {PLACEMENT_TREND_FLOOR:g}, a quarter of "
        f"the paper's {paper_trend:.4f}); "
        f"power for a paper-sized trend: {power:.2f}. Last layer: a dense layer just before the last minus a dense "
        f"last layer, over {len(both)} seeds, {lastiv.estimate:+.4f} [{lastiv.low:+.4f}, {lastiv.high:+.4f}] nats "
        f"(floor {PLACEMENT_LAST_LAYER_FLOOR:g}): {last_verdict}"
    )
    return {
        **base,
        "value": comb.estimate,
        "ci_low": comb.low,
        "ci_high": comb.high,
        "observed": comb.estimate,
        "se": comb.se,
        "df": df,
        "p_value": comb.p_greater,
        "power": power,
        "verdict": verdict,
        "note": note,
    }
