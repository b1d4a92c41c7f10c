"""Evaluation, torch-free: annotation readers (data), metrics (NME, FR, AUC, CED, per-subset)
and the registry of named evaluation sets (sets). Every stage scores faces through here:
export parity faces, quantize calibration and drift, the benchmark and `train evaluate`."""
