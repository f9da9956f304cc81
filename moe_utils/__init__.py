"""moe_utils: load Mixture-of-Experts models, trace their experts and measure what the paper measured."""

__version__ = "0.1.0"
