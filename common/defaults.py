"""The shipped model and where its bundles go: the default of every stage's CLI and of
`make all`, named once (the Makefile's MODEL / ART say the same)."""
MODEL = "models/pfld68_w05.pt"           # the shipped checkpoint
BUNDLES = "artifacts/pfld68_w05"         # its bundles: make export / quantize write them here
