"""Prove the CI gate both ways on this machine: `make gate` passes N times back to back, and a
real speed regression fails it every time.

    python tools/gate_proof.py pass --repeat 10            # make gate x10, a JSON line each
    python tools/gate_proof.py regress --repeat 10         # FP32 files labelled INT8

`regress` copies the bundles to ART-regressed and replaces each gated INT8 bundle's model
file(s) with its FP32 sibling's (meta.json still says int8): the "INT8" row then runs at FP32
speed. It benchmarks that folder once (the rows the pairs are found from), then times the pairs
and runs the gate `--repeat` times, and counts how often each speed check failed. Size checks
fail too on such bundles; what this proves is that the speed checks fail on their own.
Team tool, not part of the pipeline. Writes its summary to --out (JSON).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SPEED = re.compile(r"^speed int8/fp32\s+(.+?)\s{2,}<=.*?\s{2,}(\S+ \+- \S+).*\s(ok|FAIL)$")


def speed_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        m = SPEED.match(line.strip())
        if m:
            out.append({"pair": m.group(1).strip(), "ratio": m.group(2), "result": m.group(3)})
    return out


def regressed_copy(art: Path, dst: Path, gates: dict) -> None:
    from runtime.bundle import BundleMeta
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(art, dst, ignore=shutil.ignore_patterns("benchmark", "gate-run", "*-run"))
    for pair in gates["speed_ratio_max"]:
        fast, base = dst / pair["int8"], dst / pair["fp32"]
        shutil.rmtree(fast)
        shutil.copytree(base, fast)
        meta = BundleMeta.load(fast, verify=False)
        meta.precision = "int8"
        meta.lineage = replace(meta.lineage, stage=pair["int8"])
        meta.write(fast)


@click.group()
def main():
    """Repeat the gate on this machine, as it is and on regressed bundles."""


@main.command("pass")
@click.option("--repeat", default=10)
@click.option("--out", default="artifacts/gate_proof_pass.json")
def pass_(repeat, out):
    """Run `make gate` --repeat times back to back."""
    runs = []
    for i in range(repeat):
        t0 = time.time()
        p = subprocess.run(["make", "-s", "gate"], cwd=REPO, capture_output=True, text=True)
        runs.append({"run": i + 1, "exit": p.returncode, "wall_s": round(time.time() - t0, 1),
                     "speed": speed_lines(p.stdout + p.stderr),
                     "failed": [ln for ln in (p.stdout + p.stderr).splitlines() if ln.rstrip().endswith("FAIL")]})
        click.echo(json.dumps(runs[-1]))
    Path(out).write_text(json.dumps(runs, indent=1))
    click.echo(f"{sum(r['exit'] == 0 for r in runs)} of {repeat} passed")


@main.command()
@click.option("--repeat", default=10)
@click.option("--art", default="artifacts/student_w05", type=click.Path(file_okay=False, exists=True))
@click.option("--out", default="artifacts/gate_proof_regress.json")
def regress(repeat, art, out):
    """Gate FP32 files labelled INT8 --repeat times; every speed check must fail each time."""
    from benchmark.gate import DEFAULT_GATES, load_gates
    gates = load_gates(DEFAULT_GATES)
    work = REPO / "artifacts" / "regressed"
    bundles = work / gates["model"]         # the gates name the model by its bundles folder
    regressed_copy(Path(art), bundles, gates)
    py, run_dir = sys.executable, work / "gate-run"
    subprocess.run([py, "benchmark/run.py", "--backend", "all", "--threads", "1", "--runs", "20",
                    "--no-plots", "--max-faces", "0", "--bundles", str(bundles), "--checkpoint",
                    "models/student_w05.pt", "--out", str(run_dir)], cwd=REPO, check=True,
                   capture_output=True)
    runs = []
    for i in range(repeat):
        subprocess.run([py, "benchmark/pairs.py", "--run", str(run_dir)], cwd=REPO, check=True,
                       capture_output=True)
        p = subprocess.run([py, "benchmark/gate.py", "--run", str(run_dir)], cwd=REPO,
                           capture_output=True, text=True)
        runs.append({"run": i + 1, "exit": p.returncode, "speed": speed_lines(p.stdout)})
        click.echo(json.dumps(runs[-1]))
    Path(out).write_text(json.dumps(runs, indent=1))
    every = all(r["exit"] == 1 and len(r["speed"]) == len(gates["speed_ratio_max"])
                and all(s["result"] == "FAIL" for s in r["speed"]) for r in runs)
    click.echo(f"every speed check failed in every run: {every}")


@main.command()
@click.option("--passed", "pass_json", default="artifacts/gate_proof_pass.json", type=click.Path(exists=True))
@click.option("--regressed", "regress_json", default="artifacts/gate_proof_regress.json", type=click.Path(exists=True))
def table(pass_json, regress_json):
    """The two proofs as one markdown table (ratio +- spread per pair and run, and the result)."""
    for title, path in (("make gate as it is", pass_json), ("FP32 files labelled INT8", regress_json)):
        runs = json.loads(Path(path).read_text())
        pairs = [s["pair"] for s in runs[0]["speed"]]
        click.echo(f"\n{title}:\n")
        click.echo("| run | " + " | ".join(pairs) + " | gate |")
        click.echo("|---" * (len(pairs) + 2) + "|")
        for r in runs:
            cells = [f"{s['ratio']} {s['result']}" for s in r["speed"]]
            click.echo(f"| {r['run']} | " + " | ".join(cells) + f" | {'pass' if r['exit'] == 0 else 'FAIL'} |")


if __name__ == "__main__":
    main()
