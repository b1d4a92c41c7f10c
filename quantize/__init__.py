"""quantize stage: FP32 bundles -> INT8 bundles per backend, judged by NME drift on real faces.

quantize.backends holds one quantizer per engine (registry BACKENDS); quantize.core runs the
calibration, the drift check and search, writes the bundles and quantize_report.json, with
quantize.data (settings, calibration and scored faces), quantize.scoring (scores, drift,
latency) and quantize.search (the sensitivity search); quantize/run.py is the CLI
(`make quantize`).
"""
