"""Plan and run a benchmark: one row per (target, device, execution precision, threads), each
measured in a fresh worker process (benchmark/measure.py), written as a JSON record, then
rendered to results.md and plots (benchmark/report.py).

    from benchmark.core import BenchConfig, run
    records = run(BenchConfig(backends=("openvino",), threads=(1,)))

Targets come from the engine registry (runtime.engines.ENGINES plus the torch reference,
benchmark.torch_engine.bench_engines()): every bundle under each --bundles folder (one folder a
model: ours, imported ones) whose meta.json names a selected engine and precision, the torch
checkpoint, and any external model files. Each model's reference row runs first among its rows:
the torch FP32 row when --checkpoint is the model's own checkpoint, else the model's own FP32
bundle (onnx_sim_fp32, onnx_fp32, tflite_fp32 or openvino_fp32 at f32, the first present);
drift is measured against it. A missing engine, device, bundle or checkpoint is a "skipped" row
with the reason; a failure is an "error" row with the message; the run always continues.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from common import defaults
from benchmark import records as R
from benchmark.measure import EVAL_SETS, load_sets
from benchmark.targets import Target, checkpoint_target, discover_bundles, external_target
from benchmark.torch_engine import TorchEngine, bench_engines
from runtime.bundle import PRECISIONS, atomic_write_json
from runtime.errors import LandmarkError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLES = defaults.BUNDLES
DEFAULT_CHECKPOINT = defaults.MODEL
EXEC_PRECISIONS = ("default", "f32")   # "default": the device's own choice (bf16 on this CPU)
REFERENCE_STAGES = ("onnx_sim_fp32", "onnx_fp32", "tflite_fp32", "openvino_fp32")


class PlanError(LandmarkError, ValueError):
    """The requested rows cannot be planned (unknown backend or precision, bad thread count)."""


@dataclass
class BenchConfig:
    backends: tuple[str, ...] = ("all",)
    precisions: tuple[str, ...] = PRECISIONS
    threads: tuple[int, ...] = (1, 2)
    devices: tuple[str, ...] = ("CPU",)
    exec_precisions: tuple[str, ...] = EXEC_PRECISIONS   # for engines that take a precision hint
    bundles: tuple[str, ...] = (DEFAULT_BUNDLES,)   # one folder of bundles per model
    checkpoint: str | None = DEFAULT_CHECKPOINT    # torch FP32 reference of the model it made
    eval_sets: tuple[str, ...] = EVAL_SETS        # evaluation.sets keys (SET/PROTOCOL)
    out: str | None = None                # default: <first bundles folder>/benchmark
    wflw: str | None = None               # default: evaluation.data.default_root("wflw")
    w300: str | None = None
    max_faces: int = 0                    # 0: every face of each evaluation set
    warmup: int = 20
    runs: int = 200
    batch: int = 16                       # throughput batch
    max_seconds: float = 10.0             # time cap of each timing loop (>= 10 runs are kept)
    externals: tuple[tuple[str, str], ...] = ()   # (model file, spec.json)
    timeout_s: float = 900.0
    plots: bool = True
    # accuracy does not depend on the thread count: by default it is measured at the first
    # thread count of each (target, device, execution precision) and copied to the others
    accuracy_all_threads: bool = False

    def __post_init__(self):
        if isinstance(self.bundles, (str, Path)):     # one model: a plain folder is fine
            self.bundles = (str(self.bundles),)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.bundles[0]) / "benchmark"


@dataclass
class Row:
    target: Target
    device: str                  # as shown ("CPU" is each engine's default device)
    threads: int | None
    hint: str                    # execution precision hint: "default" or e.g. "f32"
    status: str = ""             # preset "skipped"/"error" for rows that cannot be started
    reason: str = ""
    role: str = ""               # "reference" for the torch FP32 row drift is measured against

    @property
    def id(self) -> str:
        return R.record_id(self.target.model, self.target.name, self.device, self.threads, self.hint)

    @property
    def sibling_key(self) -> tuple:
        """Rows with the same key differ only in threads and share one accuracy measurement."""
        return (self.target.model, self.target.name, self.device, self.hint)

    def describe(self) -> str:
        t = self.target
        th = f"x{self.threads}" if self.threads is not None else "-"
        return f"{t.name:<16} {t.backend:<11} {t.precision:<5} {self.device:<4} {th:<3} exec={self.hint}"


def selected_backends(names) -> list[str]:
    names, engines = list(names), bench_engines()
    if "all" in names:
        return list(engines)
    unknown = [n for n in names if n not in engines]
    if unknown:
        raise PlanError(f"unknown backend {', '.join(unknown)}; known: {', '.join(engines)}, all")
    return names


def _hints(cls, cfg: BenchConfig) -> tuple[str, ...]:
    # only engines that can report/pin an execution precision get one row per hint
    return tuple(cfg.exec_precisions) if cls.reports_precision else ("default",)


def _expand(t: Target, cfg: BenchConfig, devices=None, threads=None, hints=None, role="") -> list[Row]:
    devices = devices or cfg.devices
    if t.reason:   # cannot be loaded at all: one row, not one per thread count
        return [Row(t, devices[0], None, "default", t.status, t.reason, role)]
    cls = bench_engines().get(t.backend)
    if cls is None:
        return [Row(t, devices[0], None, "default", "skipped",
                    f"{t.name}: engine {t.backend!r} is not registered "
                    f"(known: {', '.join(bench_engines())})", role)]
    ok, why = cls.available()
    if not ok:
        return [Row(t, devices[0], None, "default", "skipped", why, role)]
    return [Row(t, d, n, h, role=role) for d in devices for h in (hints or _hints(cls, cfg))
            for n in (threads or cfg.threads)]


def _reference(pool: list[Target], ck: Target | None, cfg: BenchConfig) -> list[Row]:
    """The reference row of one model: its torch checkpoint, else its own FP32 bundle."""
    if ck is not None:
        return _expand(ck, cfg, devices=["CPU"], threads=[cfg.threads[0]], hints=["default"],
                       role="reference")
    for stage in REFERENCE_STAGES:
        t = next((t for t in pool if t.name == stage and not t.reason), None)
        if t is not None:
            hint = "f32" if bench_engines()[t.backend].reports_precision else "default"
            return _expand(t, cfg, devices=["CPU"], threads=[cfg.threads[0]], hints=[hint],
                           role="reference")
    return []


def plan(cfg: BenchConfig) -> list[Row]:
    """Every row of the run; each model's reference row first among its rows."""
    if not cfg.threads or any(t < 1 for t in cfg.threads):
        raise PlanError(f"threads must be positive integers, got {cfg.threads}")
    bad = [p for p in cfg.precisions if p not in PRECISIONS]
    if bad:
        raise PlanError(f"unknown precision {', '.join(bad)}; known: {', '.join(PRECISIONS)}")
    backends = selected_backends(cfg.backends)
    names = [Path(b).name for b in cfg.bundles]
    if len(set(names)) != len(names):
        raise PlanError(f"two --bundles folders share a name ({', '.join(names)}); rows are "
                        "named by folder")
    pools = {Path(b).name: discover_bundles(b) for b in cfg.bundles}
    owner = None
    if cfg.checkpoint:
        ck = checkpoint_target(cfg.checkpoint, names[0])
        shas = {m: {t.root_sha for t in pool} for m, pool in pools.items()}
        owner = next((m for m in names if ck.meta is not None and ck.root_sha in shas[m]),
                     names[0] if len(names) == 1 else None)
        if owner is None:      # nobody's checkpoint: its own model, with its own name
            owner = Path(cfg.checkpoint).stem
            pools[owner] = []
        ck.model = owner
    rows: list[Row] = []
    have: set[str] = set()

    def add(new):
        for r in new:
            if r.id not in have:
                rows.append(r)
                have.add(r.id)

    for model, bundles in pools.items():
        pool = bundles + ([ck] if model == owner else [])
        add(_reference(pool, ck if model == owner else None, cfg))
        if model not in names:       # a checkpoint no bundles folder came from: its row only
            continue
        folder = next((b for b in cfg.bundles if Path(b).name == model), model)
        for backend in backends:
            if backend == TorchEngine.name and model != owner:
                continue            # the torch engine runs checkpoints only: the reference row
            cls = bench_engines()[backend]
            for precision in cfg.precisions:
                if precision not in getattr(cls, "precisions", PRECISIONS):
                    continue
                found = [t for t in pool if t.backend == backend and t.precision == precision]
                if not found:
                    have_names = ", ".join(t.name for t in pool if t.kind == "bundle") or "none"
                    found = [Target(model, f"{backend}_{precision}", backend, precision, "missing",
                                    reason=f"no {backend} {precision} bundle under {folder} "
                                           f"(bundles there: {have_names}); run `make export` / "
                                           "`make quantize`")]
                for t in found:
                    add(_expand(t, cfg))
        for t in pool:   # a bundle whose meta.json cannot be read names no engine: show it anyway
            if t.status == "error" and t.backend not in bench_engines():
                add(_expand(t, cfg))
    for model_file, spec in cfg.externals:
        add(_expand(external_target(model_file, spec), cfg))
    return rows


def _engine_ref(cls) -> dict | None:
    """Where a registered engine class lives, so a worker can import engines from plugins/tests."""
    import inspect
    if cls.__module__.startswith(("runtime.", "benchmark.")):
        return None
    try:
        file = inspect.getfile(cls)
    except TypeError:
        file = None
    return {"module": cls.__module__, "qualname": cls.__qualname__, "file": file}


def _job(row: Row, cfg: BenchConfig, arrays_out: Path) -> dict:
    t = row.target
    return {"id": row.id, "engine": t.backend, "engine_ref": _engine_ref(bench_engines()[t.backend]),
            "path": str(Path(t.path).resolve()), "meta": t.meta.to_dict(),
            "eval_sets": list(cfg.eval_sets), "threads": row.threads,
            "device": None if row.device.upper() == "CPU" else row.device,
            "hint": None if row.hint == "default" else row.hint,
            "warmup": cfg.warmup, "runs": cfg.runs, "batch": cfg.batch, "max_seconds": cfg.max_seconds,
            "wflw": str(Path(cfg.wflw).resolve()) if cfg.wflw else None,
            "w300": str(Path(cfg.w300).resolve()) if cfg.w300 else None,
            "max_faces": cfg.max_faces, "arrays_out": str(arrays_out),
            "accuracy": cfg.accuracy_all_threads or row.threads == cfg.threads[0] or row.role == "reference"}


def run_isolated(job: dict, work: Path, log: Path, timeout_s: float,
                 command: tuple[str, ...] = ("-m", "benchmark.measure")) -> dict:
    """Run one job in a fresh `python <command> JOB.json RESULT.json` process."""
    job_path, res_path = work / f"{job['id']}.job.json", work / f"{job['id']}.result.json"
    job_path.write_text(json.dumps(job))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    # OpenMP pools (torch) sized to the row's threads, BLAS helpers single-threaded; each
    # engine also gets the thread count explicitly
    env.update(OMP_NUM_THREADS=str(job["threads"] or 1), OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        with open(log, "wb") as lf:
            p = subprocess.run([sys.executable, *command, str(job_path), str(res_path)],
                               stdout=lf, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout_s:.0f} s (log: {log})"}
    if res_path.is_file():
        return json.loads(res_path.read_text())
    tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.is_file() else []
    return {"status": "error", "wall_s": time.perf_counter() - t0,
            "reason": f"worker exited with code {p.returncode} without a result "
                      f"(log: {log}): {' | '.join(tail)[-400:]}"}


def make_record(row: Row, res: dict, run_id: str, host: dict) -> dict:
    t = row.target
    meta = t.meta
    lin = meta.lineage if meta is not None else None
    mem = res.get("memory") or {}
    return {
        "schema": R.SCHEMA, "id": row.id, "run_id": run_id, "created": R.now(),
        "model": t.model, "bundle": t.name, "kind": t.kind, "role": row.role,
        "backend": t.backend, "precision": t.precision, "device": row.device, "threads": row.threads,
        "exec_precision": {"hint": row.hint, "actual": res.get("exec_precision")},
        "status": res.get("status", row.status), "reason": res.get("reason", row.reason),
        "latency": res.get("latency"), "throughput": res.get("throughput"),
        "pipeline_latency": res.get("pipeline"),
        "size_bytes": t.size_bytes, "files": t.files,
        "load_s": res.get("load_s"), "load_cold_s": res.get("load_cold_s"),
        "peak_rss_mb": mem.get("peak_rss_mb"), "memory": mem or None,
        "accuracy": {k: R.accuracy_entry(v) for k, v in (res.get("accuracy") or {}).items()},
        "eval_batch": res.get("eval_batch"), "drift": None, "drift_reason": "",
        "engine": res.get("engine"),
        "source": {"path": str(t.path) if t.path else None,
                   "stage": lin.stage if lin else None,
                   "source_checkpoint": lin.source_checkpoint if lin else None,
                   "source_model": lin.source_model if lin else None,
                   "outputs": [o.scheme for o in meta.outputs] if meta else None,
                   "scheme": meta.scheme if meta else None,
                   "preprocess": meta.preprocess.to_meta() if meta else None},
        "host": R.host_string(host), "host_info": host,
        "wall_s": res.get("wall_s"), "accuracy_s": res.get("accuracy_s"),
        "traceback": res.get("traceback"),
    }


def _summary(rec: dict) -> str:
    if rec["status"] != "ok":
        return f"{rec['status']}: {rec['reason']}"
    parts = [f"ok  {rec['latency']['median_ms']:.2f} ms (p90 {rec['latency']['p90_ms']:.2f})"]
    ex = rec["exec_precision"].get("actual")
    if ex:
        parts.append(f"exec {ex}")
    acc = rec["accuracy"]
    if acc:
        key = next(iter(acc))
        parts.append(f"NME {key} {acc[key]['nme'] * 100:.2f}%")
    d = rec.get("drift")
    if d and d.get("max_shift_px") is not None:
        parts.append(f"shift {d['max_shift_px']:.3f} px")
    parts.append(f"{rec.get('wall_s') or 0:.1f} s")
    return "  ".join(parts)


def _score(row: Row, rec: dict, arrays: dict, scored: dict, refs: dict, rec_dir: Path) -> dict:
    """Fill accuracy (own, or the sibling row's), drift against the reference and the per-face
    NME file of a record; returns the row's per-face arrays."""
    import numpy as np
    if rec["status"] != "ok":
        rec["drift_reason"] = "row did not run"
        return {}
    if not rec["accuracy"]:
        sibling = scored.get(row.sibling_key)
        if sibling is None:
            rec["accuracy_reason"] = "scored only at the first thread count, which did not run"
        else:
            rec["accuracy"], rec["accuracy_from"] = sibling[0]["accuracy"], sibling[0]["id"]
            rec["nme_file"], arrays = sibling[0].get("nme_file"), sibling[1]
    elif arrays:
        nme = {k: v for k, v in arrays.items() if k.endswith("|nme")}
        tmp = rec_dir / f".{row.id}.tmp.npz"
        np.savez(tmp, **nme)
        os.replace(tmp, rec_dir / f"{row.id}.npz")
        rec["nme_file"] = f"{row.id}.npz"
        scored.setdefault(row.sibling_key, (rec, arrays))
    ref = refs.get(row.target.model)
    if row.role == "reference":
        rec["drift_reason"] = "this row is the reference"
    elif row.target.kind == "external":
        rec["drift_reason"] = "external model: not derived from the reference checkpoint"
    elif ref is None:
        rec["drift_reason"] = "no FP32 reference row of this model in this run (see the reference row)"
    elif not arrays:
        rec["drift_reason"] = "no accuracy measured for this row"
    else:
        rec["drift"] = R.drift(arrays, ref[1], rec["accuracy"], ref[0]["accuracy"])
        rec["drift"]["reference_bundle"] = ref[0]["bundle"]
        rec["drift"]["reference"] = ref[0]["id"]
    return arrays


def run(cfg: BenchConfig, echo: Callable[[str], None] = print) -> list[dict]:
    """Run every planned row and write records, run.json, results.md and plots under cfg.out_dir."""
    t_run = time.perf_counter()
    load_sets(cfg.eval_sets, cfg.wflw, cfg.w300, cfg.max_faces)   # bad data fails before any row
    rows = plan(cfg)
    out = cfg.out_dir
    rec_dir, log_dir = out / "records", out / "logs"
    for d in (rec_dir, log_dir):   # the out folder belongs to the benchmark: replace the last run
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    host = R.host_info()
    run_id = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
    manifest = {"schema": R.SCHEMA, "run_id": run_id, "started": R.now(), "finished": None,
                "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                "config": json.loads(json.dumps(asdict(cfg), default=str)),
                "host": R.host_string(host), "host_info": host, "records": []}
    atomic_write_json(out / "run.json", manifest)
    echo(f"benchmark {run_id}: {len(rows)} rows -> {out}")
    echo(f"host: {manifest['host']}")
    records, refs, scored = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        for i, row in enumerate(rows, 1):
            echo(f"[{i:>{len(str(len(rows)))}}/{len(rows)}] {row.describe()} ...")
            arrays_out = work / f"{row.id}.npz"
            if row.status:
                res = {"status": row.status, "reason": row.reason}
            else:
                res = run_isolated(_job(row, cfg, arrays_out), work, log_dir / f"{row.id}.log",
                                   cfg.timeout_s)
            rec = make_record(row, res, run_id, host)
            arrays = _score(row, rec, R.load_arrays(arrays_out), scored, refs, rec_dir)
            if row.role == "reference" and rec["status"] == "ok":
                refs[row.target.model] = (rec, arrays)
            R.write_record(rec_dir, rec)
            manifest["records"].append(f"{row.id}.json")
            atomic_write_json(out / "run.json", manifest)
            records.append(rec)
            echo(f"    {_summary(rec)}")
    manifest["finished"] = R.now()
    manifest["wall_s"] = round(time.perf_counter() - t_run, 1)
    atomic_write_json(out / "run.json", manifest)
    from benchmark.report import render
    written = render(out, plots=cfg.plots)
    echo(f"done in {manifest['wall_s']:.0f} s: {len(records)} records; "
         + ", ".join(str(p) for p in written))
    return records
