"""The shipped model and where its bundles go: the default of every stage's CLI and of
`make all`, named once (the Makefile's MODEL / ART say the same; tests/test_defaults.py)."""
MODEL = "models/student_w05.pt"          # the shipped checkpoint (two heads: 300w68, wflw98)
BUNDLES = "artifacts/student_w05"        # its bundles: make export / quantize write them here
