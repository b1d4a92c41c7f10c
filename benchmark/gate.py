"""CI gate: compare the records of a finished benchmark run with the committed limits in
benchmark/gates.json and exit non-zero when one is violated or missing.

    python benchmark/run.py --backend all --threads 1      # measure (see `make gate`)
    python benchmark/gate.py                               # check artifacts/student_w05/benchmark

Gated: size on disk of each listed bundle (bytes); absolute NME ceilings per evaluation set
(every ok row of a listed bundle and the torch reference); drift against the torch FP32 row
per execution precision (NME difference and mean point shift); INT8 / FP32 latency ratios,
timed as pairs in one process each by benchmark/pairs.py (a ratio fails when it exceeds its
limit by more than its own spread over rounds, or when ratio + spread reaches 1: not faster).
Absolute latencies are never gated: shared CI machines make them noise. A listed bundle
without an ok row, or a limit with nothing to measure, is a failure, not a pass.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path


import click

from common import defaults
from benchmark.pairs import MAX_SPREAD, load_pairs
from benchmark.records import label, load_run
from runtime.errors import LandmarkError

HERE = Path(__file__).resolve().parent
DEFAULT_GATES = HERE / "gates.json"
DEFAULT_RUN = f"{defaults.BUNDLES}/benchmark"


class GateError(LandmarkError, ValueError):
    """The gates file is missing or malformed."""


@dataclass
class Check:
    check: str
    row: str
    limit: str
    measured: str
    ok: bool


def load_gates(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise GateError(f"gates file {path} does not exist")
    try:
        g = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GateError(f"{path} is not valid JSON: {e}") from None
    for key in ("model", "bundles"):
        if key not in g:
            raise GateError(f"{path}: missing {key!r}")
    for name, spec in g["bundles"].items():
        if not isinstance(spec, dict) or not isinstance(spec.get("max_bytes"), int):
            raise GateError(f"{path}: bundles.{name} needs an integer 'max_bytes'")
    for prec, lim in g.get("drift_max", {}).items():
        if not isinstance(lim, dict) or not lim or not set(lim) <= {"nme_delta", "shift_px", "shift_iod"}:
            raise GateError(f"{path}: drift_max.{prec} must hold 'nme_delta', 'shift_px' and/or 'shift_iod'")
    for i, pair in enumerate(g.get("speed_ratio_max", [])):
        if not {"int8", "fp32", "max"} <= set(pair):
            raise GateError(f"{path}: speed_ratio_max[{i}] needs 'int8', 'fp32' (bundle names) and 'max'")
    return g


def effective_precision(rec: dict) -> str:
    """The precision the arithmetic ran in: an fp32 bundle OpenVINO executes in bf16 is bf16."""
    actual = (rec.get("exec_precision") or {}).get("actual")
    if actual == "bf16" and rec["precision"] in ("fp32", "fp16"):
        return "bf16"
    if actual == "f16" and rec["precision"] == "fp32":
        return "fp16"
    return rec["precision"]


def _pct(v):
    return f"{v * 100:.2f} %"


def evaluate_gates(g: dict, records: list[dict], pairs: list[dict] = ()) -> list[Check]:
    checks: list[Check] = []
    model = g["model"]
    mine = [r for r in records if r.get("model") == model]
    if not mine:
        models = sorted({r.get("model") for r in records})
        checks.append(Check("records", model, "rows of this model", f"none (run has {models})", False))
        return checks
    min_faces = int(g.get("min_faces", 1))

    # 1. every listed bundle ran, and its size
    rows_of = {}
    for name, spec in g["bundles"].items():
        rows = [r for r in mine if r["bundle"] == name]
        ok_rows = [r for r in rows if r["status"] == "ok"]
        rows_of[name] = ok_rows
        if not ok_rows:
            why = "; ".join(f"{r['status']}: {r['reason']}" for r in rows) or "no record in this run"
            checks.append(Check("measured", name, "an ok row", f"missing ({why})"[:160], False))
        for r in rows:
            if r["status"] == "error":
                checks.append(Check("row status", label(r), "ok", f"error: {r['reason']}"[:160], False))
        size = next((r.get("size_bytes") for r in rows if r.get("size_bytes") is not None), None)
        checks.append(Check("size bytes", name, f"<= {spec['max_bytes']:,}",
                            "missing" if size is None else f"{size:,}",
                            size is not None and size <= spec["max_bytes"]))

    gated = [r for rs in rows_of.values() for r in rs]
    ref = [r for r in mine if r.get("role") == "reference" and r["status"] == "ok"]

    # 2. absolute NME ceilings (reference + gated rows)
    for key, ceiling in g.get("nme_max", {}).items():
        for r in ref + gated:
            a = (r.get("accuracy") or {}).get(key)
            if a is None:
                checks.append(Check(f"NME {key}", label(r), f"<= {_pct(ceiling)}", "missing", False))
                continue
            few = a["count"] < min_faces
            checks.append(Check(f"NME {key}", label(r), f"<= {_pct(ceiling)}" + (f", >= {min_faces} faces" if few else ""),
                                f"{_pct(a['nme'])} ({a['count']} faces)", a["nme"] <= ceiling and not few))
        if not ref:
            checks.append(Check(f"NME {key}", "torch reference", f"<= {_pct(ceiling)}", "missing (reference row did not run)", False))

    # 3. drift vs torch FP32, per effective precision
    limits = g.get("drift_max", {})
    for r in gated:
        prec = effective_precision(r)
        lim = limits.get(prec)
        if lim is None:
            continue
        d = r.get("drift")
        if not d or d.get("max_shift_px") is None:
            checks.append(Check(f"drift ({prec})", label(r), "measured",
                                f"missing: {r.get('drift_reason') or 'no drift in record'}", False))
            continue
        sets = d["sets"]
        if "nme_delta" in lim:
            worst = max(sets, key=lambda k: abs(sets[k].get("nme_delta", 0)))
            v = d["max_abs_nme_delta"]
            checks.append(Check(f"drift NME ({prec})", label(r), f"<= {lim['nme_delta'] * 100:.3f} pp",
                                f"{v * 100:.3f} pp ({worst})", v <= lim["nme_delta"]))
        if "shift_px" in lim:
            worst = max(sets, key=lambda k: sets[k].get("shift_px", 0))
            v = d["max_shift_px"]
            checks.append(Check(f"drift shift ({prec})", label(r), f"<= {lim['shift_px']:.3f} px",
                                f"{v:.3f} px ({worst})", v <= lim["shift_px"]))

        if "shift_iod" in lim:
            v = d.get("max_shift_iod")
            worst = max(sets, key=lambda k: sets[k].get("shift_iod", 0))
            checks.append(Check(f"drift shift/iod ({prec})", label(r), f"<= {_pct(lim['shift_iod'])}",
                                "missing" if v is None else f"{_pct(v)} ({worst})",
                                v is not None and v <= lim["shift_iod"]))

    # 4. INT8 / FP32 latency ratios, timed as pairs (benchmark/pairs.py): a ratio fails when it
    # exceeds its limit by more than the pair's own spread, or when the spread is too wide to judge
    for spec in g.get("speed_ratio_max", []):
        what = f"{spec['int8']} vs {spec['fp32']}" + (f" (exec {spec['exec']})" if "exec" in spec else "")
        mine_pairs = [p for p in pairs if p.get("model") == model and p["fast"] == spec["int8"]
                      and p["base"] == spec["fp32"]
                      and ("exec" not in spec or p["exec_hint"] == spec["exec"])]
        lim = spec["max"]
        limit_text = f"<= {lim:.2f} + spread"
        if not mine_pairs:
            checks.append(Check("speed int8/fp32", what, limit_text,
                                "missing: no paired timing in this run (run benchmark/pairs.py --run RUN)",
                                False))
            continue
        for p in mine_pairs:
            row = f"{p['fast']} vs {p['base']} x{p['threads']}" + (
                f" {p['exec_hint']}" if p["exec_hint"] != "default" else "")
            if p["status"] != "ok":
                checks.append(Check("speed int8/fp32", row, limit_text, f"error: {p['reason']}"[:160], False))
                continue
            measured = (f"{p['ratio']:.3f} +- {p['spread']:.3f} "
                        f"({p['fast_ms']:.3f} / {p['base_ms']:.3f} ms, {p['rounds']} rounds)")
            if p["spread"] > MAX_SPREAD:
                checks.append(Check("speed int8/fp32", row, f"spread <= {MAX_SPREAD:.2f}",
                                    measured + ": too noisy to judge", False))
                continue
            # the promise within the run's noise, and INT8 measurably faster than FP32 at all
            # (so a bundle that is not faster fails however noisy the run, even where max + spread >= 1)
            not_faster = lim < 1.0 and p["ratio"] + p["spread"] >= 1.0   # a limit < 1 promises faster
            if not_faster:
                measured += ": not faster than FP32"
            checks.append(Check("speed int8/fp32", row, limit_text, measured,
                                p["ratio"] <= lim + p["spread"] and not not_faster))
    return checks


def format_table(checks: list[Check]) -> str:
    head = ("check", "row", "limit", "measured", "result")
    rows = [(c.check, c.row, c.limit, c.measured, "ok" if c.ok else "FAIL") for c in checks]
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda cells: "  ".join(str(c).ljust(n) for c, n in zip(cells, w)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * n for n in w])] + [fmt(r) for r in rows])


def gate(run_dir: str | Path, gates_path: str | Path = DEFAULT_GATES) -> tuple[bool, list[Check]]:
    """(passed, checks) for the finished run in `run_dir`; RecordError/GateError on bad input."""
    g = load_gates(gates_path)
    man, records = load_run(run_dir)
    checks = evaluate_gates(g, records, load_pairs(run_dir, man["run_id"]))
    return bool(checks) and all(c.ok for c in checks), checks


@click.command(context_settings={"show_default": True})
@click.option("--run", "run_dir", default=DEFAULT_RUN, type=click.Path(file_okay=False),
              help="the --out folder of a finished benchmark run")
@click.option("--gates", "gates_path", default=None, type=click.Path(dir_okay=False),
              help="limits file  [default: benchmark/gates.json]")
def main(run_dir, gates_path):
    """Check a benchmark run against the committed limits; exit 1 on any failure."""
    try:
        passed, checks = gate(run_dir, gates_path or DEFAULT_GATES)
    except LandmarkError as e:
        click.echo(f"gate FAILED: {e}", err=True)
        sys.exit(1)
    click.echo(format_table(checks))
    hosts = sorted({p["host"] for p in load_pairs(run_dir, load_run(run_dir)[0]["run_id"])})
    for h in hosts:
        click.echo(f"speed ratios timed as pairs on: {h}")
    failed = [c for c in checks if not c.ok]
    if failed:
        click.echo(f"\ngate FAILED: {len(failed)} of {len(checks)} checks\n", err=True)
        click.echo(format_table(failed), err=True)
        g = load_gates(gates_path or DEFAULT_GATES)
        for spec in g.get("speed_ratio_max", []):
            if spec.get("cpu") and any(c.check == "speed int8/fp32" and c.row.startswith(spec["int8"] + " ")
                                       for c in failed):
                click.echo(f"note on {spec['int8']}: {spec['cpu']}", err=True)
        sys.exit(1)
    click.echo(f"\ngate passed: {len(checks)} checks")


if __name__ == "__main__":
    main()
