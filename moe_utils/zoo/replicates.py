"""The organism study's replicates: every training run of the controlled experiment, declared once.

A replicate is one training run with its own seed (initialisation and data order): a dense model,
an MoE upcycled from that seed's dense model, an MoE trained from scratch, the fine-grained MoE,
or one variant of the dense-layer placement experiment (the paper's Table 6). Seed 0 of the
dense / upcycled / scratch kinds are the shipped organisms (trained by ``moe-book zoo train``);
``tiny-moe-fine`` ships seed 0 of the fine kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moe_utils.core.errors import ReplicateError
from moe_utils.zoo import configs, train
from moe_utils.zoo.configs import TrainSpec

# Fractions of training at which the emergence snapshots are taken (0 = the initialisation).
EMERGENCE_FRACTIONS = (0.0, 0.02, 0.05, 0.10, 0.25, 0.50, 1.0)
SEED_STRIDE = 1000  # replicate r of a kind uses the shipped seed + r * SEED_STRIDE
REPLICATE_SEEDS = (0, 1, 2)
PLACEMENT_POSITIONS: tuple[int | None, ...] = (None, 0, 1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Replicate:
    """One training run of the study."""

    name: str
    kind: str  # dense | upcycled | scratch | fine | placement
    seed_index: int
    spec: TrainSpec
    layers: int | None = None  # decoder layers when not the organisms' 8 (the ladder's depth axis)
    ladder: str | None = None  # "depth" or "length" for the ladder's replicates
    parent: str | None = None  # the replicate whose final weights this one starts from (upcycling)
    dense_layer: int | None = None  # placement kind: index of the one dense FFN layer (None: all MoE)
    snapshots: tuple[int, ...] = ()  # steps at which emergence snapshots are saved
    shipped_as: str | None = None  # zoo name when this replicate's weights ship with the package
    notes: str = ""

    @property
    def organism(self) -> str:
        """The organism kind as the book names it."""
        return {
            "dense": "tiny-dense",
            "upcycled": "tiny-moe-upcycled",
            "scratch": "tiny-moe-scratch",
            "fine": "tiny-moe-fine",
            "placement": "placement",
        }[self.kind]

    @property
    def is_moe(self) -> bool:
        return self.kind != "dense"

    def build(self) -> Callable:
        """The architecture builder of this kind (called with a seed)."""
        depth = {} if self.layers is None else {"num_hidden_layers": self.layers}
        if self.kind == "dense":
            return lambda seed: train.build_dense(seed, **depth)
        if self.kind == "scratch":
            return lambda seed: train.build_moe(seed, **depth)
        if self.kind == "fine":
            return lambda seed: train.build_fine(seed, **depth)
        if self.kind == "placement":
            return lambda seed: train.build_placement(seed, self.dense_layer)
        raise ReplicateError(
            f"{self.kind} replicates are built from their parent, not from scratch; train the parent and upcycle it"
        )


# The ladder (pre-registered in book/preregistration.md): depth at a fixed recipe and token budget,
# and training length (4x the organisms' budget) with snapshots on a doubling grid.
LADDER_DEPTHS = (4, 16)
LADDER_LENGTH_FACTOR = 4
LADDER_LENGTH_SNAPSHOTS = (300, 600, 1200, 2400, 4800)


def _snapshot_steps(steps: int) -> tuple[int, ...]:
    return tuple(sorted({round(f * steps) for f in EMERGENCE_FRACTIONS}))


def _seeded(spec: TrainSpec, r: int) -> TrainSpec:
    from dataclasses import replace

    return replace(spec, seed=spec.seed + r * SEED_STRIDE)


def _build_registry() -> dict[str, Replicate]:
    reg: dict[str, Replicate] = {}
    ts = configs.TRAIN_SPECS
    fine_spec = TrainSpec(steps=configs.TOTAL_STEPS, lr=2e-3, warmup_steps=60, seed=4)
    for r in REPLICATE_SEEDS:
        shipped = r == 0
        reg[f"dense-s{r}"] = Replicate(
            f"dense-s{r}", "dense", r, _seeded(ts["tiny-dense"], r), shipped_as="tiny-dense" if shipped else None
        )
        reg[f"upcycled-s{r}"] = Replicate(
            f"upcycled-s{r}",
            "upcycled",
            r,
            _seeded(ts["tiny-moe-upcycled"], r),
            parent=f"dense-s{r}",
            shipped_as="tiny-moe-upcycled" if shipped else None,
        )
        scratch = _seeded(ts["tiny-moe-scratch"], r)
        reg[f"scratch-s{r}"] = Replicate(
            f"scratch-s{r}",
            "scratch",
            r,
            scratch,
            snapshots=_snapshot_steps(scratch.steps) if r == 1 else (),
            shipped_as="tiny-moe-scratch" if shipped else None,
        )
        fine = _seeded(fine_spec, r)
        reg[f"fine-s{r}"] = Replicate(
            f"fine-s{r}",
            "fine",
            r,
            fine,
            snapshots=_snapshot_steps(fine.steps) if r == 0 else (),
            shipped_as="tiny-moe-fine" if shipped else None,
        )
    _add_ladder(reg)
    place_spec = TrainSpec(steps=configs.PLACEMENT_STEPS, lr=2e-3, warmup_steps=40, seed=5)
    for pos in PLACEMENT_POSITIONS:
        tag = "all-moe" if pos is None else f"dense{pos}"
        for r in REPLICATE_SEEDS:
            name = f"place-{tag}-s{r}"
            reg[name] = Replicate(name, "placement", r, _seeded(place_spec, r), dense_layer=pos)
    return reg


def _add_ladder(reg: dict[str, Replicate]) -> None:
    """The depth and training-length rungs; seeds and recipes are those of the 8-layer replicates."""
    from dataclasses import replace

    for depth in LADDER_DEPTHS:
        for r in REPLICATE_SEEDS:
            name = f"scratch-L{depth}-s{r}"
            reg[name] = replace(reg[f"scratch-s{r}"], name=name, layers=depth, ladder="depth", shipped_as=None)
    for r in (0, 1):
        base = reg[f"scratch-s{r}"]
        steps = base.spec.steps * LADDER_LENGTH_FACTOR
        name = f"scratch-long-s{r}"
        reg[name] = replace(
            base,
            name=name,
            spec=replace(base.spec, steps=steps),
            ladder="length",
            snapshots=LADDER_LENGTH_SNAPSHOTS,
            shipped_as=None,
        )
        up = reg[f"upcycled-s{r}"]
        # upcycled = dense T/2 + continued; 4x the budget continues for 4T - T/2 steps
        cont = configs.TOTAL_STEPS * LADDER_LENGTH_FACTOR - configs.TOTAL_STEPS // 2
        name = f"upcycled-long-s{r}"
        snaps = tuple(s for s in LADDER_LENGTH_SNAPSHOTS if s < cont) + (cont,)
        reg[name] = replace(
            up, name=name, spec=replace(up.spec, steps=cont), ladder="length", snapshots=(0, *snaps), shipped_as=None
        )


REPLICATES: dict[str, Replicate] = _build_registry()


def get(name: str) -> Replicate:
    """The replicate called ``name``; a clear error listing the names otherwise."""
    try:
        return REPLICATES[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(REPLICATES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown replicate {name!r}{hint}; 'moe-book zoo study --list' lists them") from None


def chain(name: str) -> list[Replicate]:
    """The replicate and the ones it starts from, parents first."""
    rep = get(name)
    out = [rep]
    while rep.parent is not None:
        rep = get(rep.parent)
        out.insert(0, rep)
    return out


def prepared_dir(out: Path) -> Path:
    """The folder of a study output folder's prepared corpus, tokenizer and long-run stream."""
    return Path(out) / "prepared"


def replicate_dir(out: Path, name: str) -> Path:
    """The folder of one replicate in a study output folder."""
    return Path(out) / "replicates" / name


def snapshot_dir(out: Path, name: str, step: int) -> Path:
    """The folder of one training snapshot of a replicate."""
    return replicate_dir(out, name) / "snapshots" / f"step-{step:05d}"
