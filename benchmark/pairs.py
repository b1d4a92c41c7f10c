"""Gated speed ratios timed as pairs: the INT8 row and its FP32 row of every ratio in
benchmark/gates.json, timed against each other in the same process, in alternating rounds.

    python benchmark/run.py --backend all --threads 1 --out RUN    # the rows (`make gate`)
    python benchmark/pairs.py --run RUN                             # the pairs of its ratios
    python benchmark/gate.py --run RUN                              # checks both

Why: the benchmark times each row in its own fresh process, one after another. On a shared
machine a ratio of two such rows pairs two different moments (and two draws of whatever an
engine decides per process), and a gate on it flakes. Here each pair is timed in PROCESSES
fresh processes; each loads both models and runs ROUNDS rounds of CALLS calls of each, the
order reversed every other round. The ratio is the median of the per-round ratios; its spread
is half the interquartile range of those ratios, over all processes, so noise between
processes counts too. benchmark/gate.py fails a ratio that exceeds its limit by more than that
spread, a ratio that with its spread reaches 1 (ratio + spread >= 1: INT8 not measurably
faster, so a regression fails however noisy the run), and a pair too noisy to judge (spread over MAX_SPREAD).

Writes RUN/pairs/<id>.json (one record per pair, with every round and the CPU flags).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click
import numpy as np

from common import host_info, host_string, now, time_rounds

ROUNDS = 12          # rounds per process
CALLS = 30           # timed calls of each model per round
WARMUP = 30          # untimed calls of each model before the first round
PROCESSES = 3        # fresh processes per pair (an engine may differ from one process to the next)
MAX_SPREAD = 0.15    # a spread above this cannot tell a pass from a failure: the check fails
SCHEMA = 1


def pair_id(model: str, fast: str, base: str, device: str, threads, hint: str) -> str:
    from benchmark.records import record_id
    return record_id(model, f"{fast}_vs_{base}", device, threads, hint)


def plan_pairs(gates: dict, records: list[dict]) -> tuple[list[dict], list[str]]:
    """(jobs, problems): one job per gated ratio and (device, threads, exec hint) the run has
    ok rows of both bundles for; a ratio with no such pair is a problem (the gate fails it)."""
    model = gates["model"]
    ok = [r for r in records if r.get("model") == model and r["status"] == "ok" and r.get("latency")]
    key = lambda r: (r["device"], r["threads"], r["exec_precision"]["hint"])  # noqa: E731
    jobs, problems = [], []
    for spec in gates.get("speed_ratio_max", []):
        fast = [r for r in ok if r["bundle"] == spec["int8"]]
        if "exec" in spec:
            fast = [r for r in fast if r["exec_precision"]["hint"] == spec["exec"]]
        base = {key(r): r for r in ok if r["bundle"] == spec["fp32"]}
        n = 0
        for f in fast:
            b = base.get(key(f))
            if b is None:
                continue
            n += 1
            jobs.append({"id": pair_id(model, spec["int8"], spec["fp32"], *key(f)),
                         "model": model, "fast": f["bundle"], "base": b["bundle"],
                         "engine": f["backend"], "device": f["device"], "threads": f["threads"],
                         "hint": f["exec_precision"]["hint"],
                         "fast_path": f["source"]["path"], "base_path": b["source"]["path"],
                         "fast_meta": str(Path(f["source"]["path"]).parent),
                         "base_meta": str(Path(b["source"]["path"]).parent)})
        if not n:
            problems.append(f"{spec['int8']} vs {spec['fp32']}: no ok rows of both with the same "
                            "device/threads/exec in this run")
    return jobs, problems


def summarize(rounds: list[dict]) -> dict:
    """Per-process {fast: [ms...], base: [ms...]} -> the pair's figures."""
    fast = np.concatenate([r["fast"] for r in rounds])
    base = np.concatenate([r["base"] for r in rounds])
    ratios = fast / base
    q1, q3 = np.percentile(ratios, [25, 75])
    per_process = [float(np.median(np.array(r["fast"]) / np.array(r["base"]))) for r in rounds]
    return {"ratio": float(np.median(ratios)), "spread": float((q3 - q1) / 2),
            "ratio_min": float(ratios.min()), "ratio_max": float(ratios.max()),
            "ratio_per_process": per_process,
            "fast_ms": float(np.median(fast)), "base_ms": float(np.median(base)),
            "rounds": int(len(ratios))}


# -- the worker: one process, both models ------------------------------------------------------
def time_pair(job: dict) -> dict:
    """Load both models with the row's settings and time them in alternating rounds."""
    from benchmark.measure import load_sets, resolve_engine
    from evaluation.metrics import face_batch
    from runtime.bundle import BundleMeta

    cls = resolve_engine(job)
    kwargs = {"threads": job["threads"], "device": None if job["device"].upper() == "CPU" else job["device"],
              "precision": None if job["hint"] == "default" else job["hint"]}
    face = next(s.faces() for s in load_sets(job["eval_sets"], job.get("wflw"), job.get("w300"))
                if s.faces())[0]
    protocol = "rect" if face.rect is not None else "landmarks"
    fns, describe = {}, {}
    for side in ("fast", "base"):
        meta = BundleMeta.load(job[f"{side}_meta"], verify=False)
        engine = cls(job[f"{side}_path"], **kwargs)
        x = face_batch([face], meta.preprocess, protocol)
        fns[side] = (lambda e, x: (lambda _: e(x)))(engine, x)
        describe[side] = engine.describe()
    ms = time_rounds(fns, None, job["rounds"], job["calls"], job["warmup"])
    return {"status": "ok", "fast": ms["fast"], "base": ms["base"], "engines": describe}


def worker(argv: list[str]) -> int:
    import os
    from runtime.bundle import atomic_write_json
    job = json.loads(Path(argv[0]).read_text())
    try:
        res = time_pair(job)
    except Exception as e:  # noqa: BLE001 - a failure becomes the pair's reason
        res = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
    res["pid"] = os.getpid()
    atomic_write_json(argv[1], res)
    return 0


# -- the driver --------------------------------------------------------------------------------
def measure_pairs(run_dir: str | Path, gates_path: str | Path, rounds: int = ROUNDS,
                  calls: int = CALLS, processes: int = PROCESSES, warmup: int = WARMUP,
                  echo=print) -> list[dict]:
    """Time every gated pair of the finished run in `run_dir`; writes run_dir/pairs/*.json."""
    from benchmark.core import run_isolated
    from benchmark.gate import load_gates
    from benchmark.records import load_run
    from runtime.bundle import atomic_write_json

    run_dir = Path(run_dir)
    gates = load_gates(gates_path)
    man, records = load_run(run_dir)
    jobs, problems = plan_pairs(gates, records)
    for p in problems:
        echo(f"pairs: {p}")
    out = run_dir / "pairs"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.json"):
        old.unlink()
    cfg = man.get("config") or {}
    host = host_info()
    written = []
    with tempfile.TemporaryDirectory(prefix="pairs-") as tmp:
        for i, job in enumerate(jobs, 1):
            job.update(rounds=rounds, calls=calls, warmup=warmup,
                       eval_sets=cfg.get("eval_sets") or None, wflw=cfg.get("wflw"), w300=cfg.get("w300"))
            if not job["eval_sets"]:
                from benchmark.measure import EVAL_SETS
                job["eval_sets"] = list(EVAL_SETS)
            echo(f"[{i}/{len(jobs)}] {job['fast']} vs {job['base']} ({job['engine']}, x{job['threads']}, "
                 f"exec {job['hint']}): {processes} processes x {rounds} rounds x {calls} calls ...")
            per, reason = [], ""
            for k in range(processes):
                res = run_isolated({**job, "id": f"{job['id']}.p{k}"}, Path(tmp),
                                   run_dir / "logs" / f"pair.{job['id']}.p{k}.log", 600,
                                   command=("-m", "benchmark.pairs", "--worker"))
                if res.get("status") != "ok":
                    reason = res.get("reason", "worker failed")
                    break
                per.append({"fast": res["fast"], "base": res["base"], "pid": res.get("pid")})
            rec = {"schema": SCHEMA, "id": job["id"], "run_id": man["run_id"], "created": now(),
                   "model": job["model"], "fast": job["fast"], "base": job["base"],
                   "engine": job["engine"], "device": job["device"], "threads": job["threads"],
                   "exec_hint": job["hint"], "method": {"processes": processes, "rounds": rounds,
                                                        "calls": calls, "warmup": warmup},
                   "status": "ok" if not reason else "error", "reason": reason,
                   "per_process": per, "host": host_string(host), "cpu_flags": host["cpu_flags"]}
            if not reason:
                rec.update(summarize(per))
                echo(f"    ratio {rec['ratio']:.3f} +- {rec['spread']:.3f} "
                     f"({rec['fast_ms']:.3f} / {rec['base_ms']:.3f} ms; per process "
                     + ", ".join(f"{v:.3f}" for v in rec["ratio_per_process"]) + ")")
            else:
                echo(f"    error: {reason}")
            atomic_write_json(out / f"{job['id']}.json", rec)
            written.append(rec)
    return written


def load_pairs(run_dir: str | Path, run_id: str) -> list[dict]:
    """The pair records of the run `run_id` in run_dir/pairs (others are stale and ignored)."""
    recs = []
    for p in sorted((Path(run_dir) / "pairs").glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if rec.get("run_id") == run_id:
            recs.append(rec)
    return recs


@click.command(context_settings={"show_default": True})
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False),
              help="the --out folder of a finished benchmark run")
@click.option("--gates", "gates_path", default=None, type=click.Path(dir_okay=False),
              help="limits file whose speed_ratio_max pairs are timed  [default: benchmark/gates.json]")
@click.option("--rounds", default=ROUNDS, help="rounds per process")
@click.option("--calls", default=CALLS, help="timed calls of each model per round")
@click.option("--processes", default=PROCESSES, help="fresh processes per pair")
@click.option("--warmup", default=WARMUP, help="untimed calls of each model first")
def main(run_dir, gates_path, rounds, calls, processes, warmup):
    """Time the INT8/FP32 pairs of the gated speed ratios against each other."""
    from benchmark.gate import DEFAULT_GATES
    from runtime.errors import LandmarkError
    try:
        measure_pairs(run_dir, gates_path or DEFAULT_GATES, rounds, calls, processes, warmup,
                      echo=click.echo)
    except LandmarkError as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:      # started by measure_pairs: --worker JOB.json RESULT.json
        sys.exit(worker(sys.argv[2:]))
    main()
