"""Single-pass tracing vs. the paper code's re-run-per-layer method for all-expert outputs.

The re-run method (as in the paper's code) runs the model once per MoE layer i with that layer's
top-k forced to E and records every expert's output inside layer i's expert computation. The
single-pass method runs the model once per sequence with the normal top-k, captures each MoE
block's input, and evaluates all experts on it afterwards. This script times both on a tiny
random Mixtral with >= 8 layers and checks they give the same expert outputs.

    python benchmarks/trace_vs_rerun.py [--layers 8] [--tokens 256] [--sequences 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_utils.models.loading import load_model
from moe_utils.models.trace import expert_outputs, trace
from moe_utils.models.weights import layer_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic import machine, save_results


def single_pass(lm, seqs) -> dict[int, torch.Tensor]:
    tr = trace(lm, seqs)
    return {layer: expert_outputs(layer_weights(lm, layer, dtype=None), tr[layer].x) for layer in tr.layers}


def rerun_per_layer(lm, seqs) -> dict[int, torch.Tensor]:
    """Paper-style: L re-runs, top-k = E at layer i, per-expert outputs recorded at layer i."""
    out = {}
    for layer in lm.moe_layers:
        block = lm.model.model.layers[layer].mlp
        router, experts = block.gate, block.experts
        saved_k, saved_forward = router.top_k, experts.forward
        recorded: list[torch.Tensor] = []

        def recording_forward(hidden, top_k_index, top_k_weights, experts=experts, rec=recorded):
            n, E = hidden.shape[0], experts.gate_up_proj.shape[0]
            per_expert = torch.empty(n, E, hidden.shape[1])
            mixed = torch.zeros_like(hidden)
            for e in range(E):
                gate, up = F.linear(hidden, experts.gate_up_proj[e]).chunk(2, dim=-1)
                y = F.linear(experts.act_fn(gate) * up, experts.down_proj[e])
                per_expert[:, e] = y
                w = (top_k_weights * (top_k_index == e)).sum(-1, keepdim=True)
                mixed += w * y
            rec.append(per_expert)
            return mixed

        router.top_k = router.num_experts
        experts.forward = recording_forward
        try:
            with torch.inference_mode():
                for ids in seqs:
                    lm.model(input_ids=torch.tensor([ids]), use_cache=False)
        finally:
            router.top_k = saved_k
            experts.forward = saved_forward
        out[layer] = torch.cat(recorded)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    lm = load_model(
        "random:mixtral",
        config_overrides=dict(
            num_hidden_layers=args.layers,
            hidden_size=64,
            intermediate_size=128,
            num_local_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=max(args.tokens, 128),
        ),
    )
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 259, (args.tokens,), generator=g).tolist() for _ in range(args.sequences)]

    a, b = single_pass(lm, seqs), rerun_per_layer(lm, seqs)  # warm-up + correctness
    worst = max(float((a[i] - b[i]).abs().max() / b[i].abs().max()) for i in a)
    t_single, t_rerun = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        single_pass(lm, seqs)
        t_single.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rerun_per_layer(lm, seqs)
        t_rerun.append(time.perf_counter() - t0)
    s, r = min(t_single), min(t_rerun)
    n = args.tokens * args.sequences
    print(
        f"model: Mixtral-style, {args.layers} layers, H=64, I=128, E=8, top-2; {n} tokens "
        f"({args.sequences} x {args.tokens}); {torch.get_num_threads()} threads; best of {args.repeats}"
    )
    print(f"single pass (1 forward/sequence + all experts from captured inputs): {s:.3f} s")
    print(f"re-run per layer ({args.layers} forwards/sequence, top-k=E at one layer): {r:.3f} s")
    print(f"speed-up: {r / s:.2f}x")
    print(f"max relative difference of all-expert outputs between methods: {worst:.2e}")
    path = save_results(
        "trace_vs_rerun",
        {
            "machine": machine(),
            "layers": args.layers,
            "tokens": n,
            "single_pass_s": s,
            "rerun_s": r,
            "speedup": r / s,
            "max_rel_difference": worst,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
