"""The shipped model is named in two places that must agree: common/defaults.py (every CLI's
default) and the Makefile's MODEL / ART (make all)."""
from __future__ import annotations

import re
from pathlib import Path

from common import defaults

REPO = Path(__file__).resolve().parents[1]


def test_makefile_and_cli_defaults_name_the_same_model():
    text = (REPO / "Makefile").read_text()
    found = dict(re.findall(r"^(MODEL|ART)\s*\?=\s*(\S+)", text, re.M))
    assert found == {"MODEL": defaults.MODEL, "ART": defaults.BUNDLES}
    assert (REPO / defaults.MODEL).is_file()
