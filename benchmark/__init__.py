"""Benchmark stage: latency, size, memory, accuracy and drift of every deployment target.

Importing the package registers the torch reference engine ("torch") in
runtime.engines.ENGINES, so the CLI, the planner and the worker all see one registry.
"""
from benchmark.torch_engine import TorchEngine  # noqa: F401  (registers "torch")
