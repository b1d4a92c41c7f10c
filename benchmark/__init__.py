"""Benchmark stage: latency, size, memory, accuracy and drift of every deployment target.

The torch reference engine lives here (benchmark.torch_engine) and is added to the runtime's
engines only in the benchmark's own view of them (`bench_engines()`): importing the package
changes nothing in runtime.engines.ENGINES, the registry a device uses.
"""
