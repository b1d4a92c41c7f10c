"""One base error class: every user-facing error derives from runtime.errors.LandmarkError, CLIs
print it as one line, and anything else (a bug) keeps its traceback."""
from __future__ import annotations

import importlib
import inspect
import json
import pkgutil

import pytest
from click.testing import CliRunner

from runtime.errors import ConfigError, LandmarkError, UnknownNameError

PACKAGES = ("runtime", "evaluation", "export", "quantize", "benchmark", "train", "common")
NOT_ERRORS = {"TargetSkipped"}      # control flow (a target this machine cannot build), not an error


def _error_classes():
    for pkg in PACKAGES:
        for m in pkgutil.iter_modules(importlib.import_module(pkg).__path__):
            if m.name in ("run", "runtime_vs", "runtime_measure", "measure", "pairs"):
                continue       # scripts: their error types are click exceptions
            try:
                mod = importlib.import_module(f"{pkg}.{m.name}")
            except ImportError:
                continue
            for name, cls in inspect.getmembers(mod, inspect.isclass):
                if cls.__module__ == mod.__name__ and issubclass(cls, Exception) \
                        and name not in NOT_ERRORS:
                    yield f"{mod.__name__}.{name}", cls


def test_every_error_type_derives_from_the_base():
    found = dict(_error_classes())
    assert len(found) >= 12, sorted(found)
    bad = [n for n, c in found.items() if not issubclass(c, LandmarkError)]
    assert not bad, f"error types outside runtime.errors.LandmarkError: {bad}"


def test_user_errors_are_typed_and_keep_their_old_bases():
    from runtime.schemes import get_scheme
    with pytest.raises(UnknownNameError) as e:
        get_scheme("nope")
    assert isinstance(e.value, KeyError) and str(e.value).startswith("unknown landmark scheme 'nope'")
    from evaluation.metrics import face_box
    from evaluation.data import Face
    import numpy as np
    with pytest.raises(ConfigError, match="unknown crop protocol"):
        face_box(Face("x.jpg", np.zeros((68, 2), np.float32)), "sideways")


def test_cli_prints_a_user_error_in_one_line_and_a_bug_with_its_traceback(tmp_path, monkeypatch):
    from benchmark import gate
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"run_id": "r", "finished": "now", "records": []}))
    bad_gates = tmp_path / "gates.json"
    bad_gates.write_text("{not json")
    res = CliRunner().invoke(gate.main, ["--run", str(run), "--gates", str(bad_gates)])
    assert res.exit_code == 1 and "gate FAILED" in res.output and "not valid JSON" in res.output
    assert isinstance(res.exception, SystemExit)              # a message, no traceback

    def bug(*a, **k):
        raise ValueError("a bug, not a user error")
    monkeypatch.setattr(gate, "evaluate_gates", bug)
    res = CliRunner().invoke(gate.main, ["--run", str(run)])
    assert isinstance(res.exception, ValueError)             # not swallowed into "error:"
