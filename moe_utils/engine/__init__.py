"""How an MoE layer computes: routing, expert math, Gram matrices of expert weights, the trace, inputs."""
