"""ARM as a tested target: the device runtime and every bundle run on emulated aarch64 (a
Debian bookworm arm64 root under qemu-user, as on Raspberry Pi OS bookworm: Python 3.11.2,
glibc 2.36), on real faces, compared with the same bundles on this x86 host.

    make arm-check                        # = python benchmark/arm/check.py --install-tools
    python benchmark/arm/check.py --cpu cortex-a72 --bundles artifacts/pfld68_w05
    python benchmark/arm/check.py --dry-run     # the plan: what would be built, run, written

Steps: (1) host tools (qemu-user-static, debootstrap; `--install-tools` apt-installs them);
(2) a cached arm64 root in --cache (debootstrap, built once into a temporary folder and renamed
into place); (3) one venv per runtime/requirements*.txt inside it, cached by the file's sha256;
(4) runtime/, the bundles and a fixed sample of real face crops (every 4th WFLW test face,
rect crops, and every 4th HELEN test face) staged in the root; (5) each bundle runs there under
`QEMU_CPU=<cpu>` through the copied runtime only, in a private mount namespace (unshare) where
/proc is mounted and /proc/cpuinfo shows a Raspberry Pi-like CPU (LiteRT and onnxruntime crash at
model load on qemu's pass-through of the host's x86 cpuinfo), so nothing stays mounted on the
host; (6) the same bundles run on the same crops here; records in the benchmark's format
(device "aarch64, emulated <cpu>", latency not meaningful), results.md and arm_report.json.

Emulator traps (not a Pi's): qemu's default CPU model offers SVE/SME, and TFLite INT8 then
computes wrong outputs; --cpu cortex-a76 (Pi 5, default) or cortex-a72 (Pi 4) match real cores.
Emulated timings mean nothing; outputs do.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import click
import numpy as np

from common import defaults

REPO = Path(__file__).resolve().parents[2]
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
PACKAGES = "python3,python3-venv,python3-pip,ca-certificates,libgomp1"
CPUS = {   # QEMU_CPU -> (what it stands for, MIDR_EL1, cpuinfo "CPU part")
    "cortex-a76": ("Raspberry Pi 5", "0x00000000414fd0b1", "0xd0b"),
    "cortex-a72": ("Raspberry Pi 4", "0x00000000410fd083", "0xd08"),
}
REQUIREMENTS = {"tflite": "requirements.txt", "onnxruntime": "requirements-onnxruntime.txt",
                "openvino": "requirements-openvino.txt"}
SETS = (("wflw:test/rect", 4), ("300w:helen_test/landmarks", 4))


class ArmError(click.ClickException):
    pass


def run(cmd, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode:
        tail = (p.stderr or p.stdout).strip().splitlines()[-8:]
        raise ArmError(f"{' '.join(map(str, cmd))[:200]} failed ({p.returncode}):\n" + "\n".join(tail))
    return p


# -- host tools and the binfmt handler -----------------------------------------------------------
def check_tools(install: bool, log) -> None:
    missing = [t for t in ("qemu-aarch64-static", "debootstrap", "unshare", "chroot")
               if shutil.which(t) is None]
    if missing and install:
        log("installing qemu-user-static binfmt-support debootstrap (apt)")
        run(["apt-get", "update", "-qq"])
        run(["apt-get", "install", "-y", "-qq", "qemu-user-static", "binfmt-support", "debootstrap"],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        missing = [t for t in ("qemu-aarch64-static", "debootstrap") if shutil.which(t) is None]
    if missing:
        raise ArmError(f"missing host tools: {', '.join(missing)} (apt-get install qemu-user-static "
                       "binfmt-support debootstrap, or run with --install-tools)")


class Binfmt:
    """Enables the kernel's qemu-aarch64 handler for the duration, and restores what it found
    (mounted binfmt_misc, enabled entry) afterwards."""
    FS = Path("/proc/sys/fs/binfmt_misc")

    def __enter__(self):
        self.mounted = False
        self.enabled = False
        if not (self.FS / "status").exists():
            run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(self.FS)])
            self.mounted = True
        entry = self.FS / "qemu-aarch64"
        if not entry.exists() or not entry.read_text().startswith("enabled"):
            run(["update-binfmts", "--enable", "qemu-aarch64"])
            self.enabled = True
        return self

    def __exit__(self, *exc):
        if self.enabled:
            subprocess.run(["update-binfmts", "--disable", "qemu-aarch64"], capture_output=True)
        if self.mounted:
            subprocess.run(["umount", str(self.FS)], capture_output=True)


# -- the root -------------------------------------------------------------------------------------
def build_root(cache: Path, log) -> Path:
    root = cache / f"{SUITE}-arm64"
    if (root / ".complete").is_file():
        return root
    tmp = cache / f"{SUITE}-arm64.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    log(f"debootstrap {SUITE} arm64 into {tmp} (a few minutes, once)")
    t = time.perf_counter()
    run(["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={PACKAGES}", SUITE,
         str(tmp), MIRROR])
    (tmp / ".complete").write_text(f"{time.perf_counter() - t:.0f} s\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def fake_cpu(root: Path, cpu: str) -> Path:
    """A Raspberry Pi-like /proc/cpuinfo (bind-mounted in the private namespace), and sysfs
    files inside the root: MIDR_EL1 (LiteRT, onnxruntime) and the CPU topology (OpenVINO's
    hwloc aborts without it)."""
    _, midr, part = CPUS[cpu]
    lines = []
    for i in range(4):
        lines += [f"processor\t: {i}", "BogoMIPS\t: 108.00",
                  "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp "
                  "cpuid asimdrdm lrcpc dcpop asimddp", "CPU implementer\t: 0x41",
                  "CPU architecture: 8", "CPU variant\t: 0x4", f"CPU part\t: {part}",
                  "CPU revision\t: 1", ""]
    info = root / "etc" / "fake-cpuinfo"
    info.write_text("\n".join(lines))
    cpus = root / "sys" / "devices" / "system" / "cpu"     # (kept: hwloc reads it on a Pi)
    for i in range(4):
        d = cpus / f"cpu{i}" / "regs" / "identification"
        d.mkdir(parents=True, exist_ok=True)
        (d / "midr_el1").write_text(midr + "\n")
        t = cpus / f"cpu{i}" / "topology"
        t.mkdir(parents=True, exist_ok=True)
        for k, v in {"core_id": i, "physical_package_id": 0, "cluster_id": 0,
                     "core_cpus_list": i, "thread_siblings_list": i, "core_siblings_list": "0-3",
                     "package_cpus_list": "0-3", "cluster_cpus_list": "0-3"}.items():
            (t / k).write_text(f"{v}\n")
        (cpus / f"cpu{i}" / "online").write_text("1\n")
    for k in ("online", "possible", "present"):
        (cpus / k).write_text("0-3\n")
    return info


def host_ca(root: Path) -> str:
    """The host's CA bundle copied into the root, so pip inside trusts what pip outside trusts
    (a proxy's own CA, for one); its path inside the root."""
    import ssl
    src = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE") or \
        ssl.get_default_verify_paths().cafile
    if src and Path(src).is_file():
        shutil.copy(src, root / "etc" / "host-ca.crt")
        return "/etc/host-ca.crt"
    return "/etc/ssl/certs/ca-certificates.crt"


def in_root(root: Path, cpu: str, command: str, timeout: int = 3600,
            sysfs: bool = False) -> subprocess.CompletedProcess:
    """Run a shell command in the arm64 root, in a private mount namespace (nothing stays
    mounted on the host), with /proc mounted and a Pi-like cpuinfo over it. sysfs: mount the
    kernel's sysfs over the root's planted /sys (OpenVINO's hwloc cannot read the planted
    topology under qemu and crashes; LiteRT and onnxruntime need the planted MIDR_EL1)."""
    info = fake_cpu(root, cpu)
    ca = host_ca(root)
    script = (f"mount -t proc proc {root}/proc && mount --bind {info} {root}/proc/cpuinfo && "
              + (f"mount -t sysfs sysfs {root}/sys && " if sysfs else "") +
              f"exec chroot {root} /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root "
              f"QEMU_CPU={cpu} PYTHONPATH=/work PIP_CERT={ca} SSL_CERT_FILE={ca} "
              f"PIP_DISABLE_PIP_VERSION_CHECK=1 /bin/sh -c {_q(command)}")
    return run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
               env={**os.environ, "QEMU_CPU": cpu}, timeout=timeout)


def _q(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def venvs(root: Path, cpu: str, engines: set[str], log) -> dict[str, str]:
    """One venv per runtime requirements file in the root, reused while the file is unchanged."""
    out = {}
    for engine, req in REQUIREMENTS.items():
        if engine not in engines:
            continue
        text = (REPO / "runtime" / req).read_bytes()
        key = hashlib.sha256(text).hexdigest()[:16]
        venv = f"/opt/rt-{engine}-{key}"
        if not (root / venv.lstrip("/") / ".installed").is_file():
            log(f"venv {venv}: pip install -r runtime/{req} (emulated, a minute or two)")
            (root / "tmp" / req).write_bytes(text)
            t = time.perf_counter()
            in_root(root, cpu, f"python3 -m venv {venv} && {venv}/bin/pip install --quiet "
                               f"--only-binary=:all: -r /tmp/{req} && touch {venv}/.installed")
            log(f"      {time.perf_counter() - t:.0f} s")
        out[engine] = venv
    return out


# -- faces and bundles ------------------------------------------------------------------------------
def bundles_of(folders) -> list[Path]:
    out = []
    for f in folders:
        out += sorted(p for p in Path(f).iterdir() if (p / "meta.json").is_file())
    if not out:
        raise ArmError(f"no bundles under {', '.join(map(str, folders))}; run `make quantize`")
    return out


def face_sample():
    from evaluation.sets import scored_set
    out = []
    for key, every in SETS:
        s = scored_set(key)
        out.append((s, s.faces()[::every]))
    return out


def crops_for(meta, sample) -> tuple[np.ndarray, list]:
    from evaluation.metrics import face_box
    pre = meta.preprocess
    xs, mats = [], []
    for s, faces in sample:
        for f in faces:
            m = pre.crop_matrix(face_box(f, s.protocol))
            xs.append(pre.normalize(pre.crop(f.image(), m))[0])
            mats.append(m)
    return np.stack(xs), mats


def score(meta, out_index, y: np.ndarray, mats, sample) -> dict:
    """NME per set of crop-normalised outputs y of one output of a bundle."""
    from evaluation.metrics import score as nme_of
    from evaluation.metrics import summarize
    from evaluation.sets import scorings
    from runtime.schemes import get_scheme
    pts = meta.preprocess.decode(y, mats)
    res, i = {}, 0
    for s, faces in sample:
        p = pts[i:i + len(faces)]
        i += len(faces)
        for sc in scorings([o.scheme for o in meta.outputs], s.scheme):
            if sc.output != out_index:
                continue
            nme = nme_of(p, faces, get_scheme(meta.outputs[out_index].scheme),
                         get_scheme(s.scheme), sc.as68)
            res[s.key + sc.suffix] = {**summarize(nme), "protocol": s.protocol,
                                      "_points": p}
    return res


# -- the check ----------------------------------------------------------------------------------------
@click.command()
@click.option("--bundles", "folders", multiple=True,
              default=(defaults.BUNDLES,), show_default=True,
              help="model folders whose bundles run on ARM (repeatable)")
@click.option("--cpu", type=click.Choice(list(CPUS)), default="cortex-a76", show_default=True,
              help="QEMU CPU model: cortex-a76 = Raspberry Pi 5, cortex-a72 = Pi 4")
@click.option("--cache", default=str(Path.home() / ".cache" / "landmark-arm"), show_default=True,
              type=click.Path(file_okay=False), help="where the arm64 root and its venvs live")
@click.option("--install-tools", is_flag=True, help="apt-get install the host tools if missing")
@click.option("--budget", default=0.10, show_default=True, help="INT8 drift budget, NME points")
@click.option("--out", default="artifacts/arm", show_default=True, type=click.Path(file_okay=False))
@click.option("--dry-run", is_flag=True, help="print the plan and check the inputs, run nothing")
def main(folders, cpu, cache, install_tools, budget, out, dry_run):
    """Run every bundle on emulated aarch64 and compare with x86 (see the module doc)."""
    log = lambda m: click.echo(m, err=True)    # noqa: E731
    from runtime.bundle import BundleMeta
    bundles = bundles_of(folders)
    metas = {b: BundleMeta.load(b) for b in bundles}
    engines = {m.engine for m in metas.values()}
    unknown = engines - set(REQUIREMENTS)
    if unknown:
        raise ArmError(f"no runtime requirements file for engine(s) {', '.join(unknown)}")
    sample = face_sample()
    plan = {"cpu": f"{cpu} ({CPUS[cpu][0]})", "root": str(Path(cache) / f"{SUITE}-arm64"),
            "venvs": {e: f"runtime/{REQUIREMENTS[e]}" for e in sorted(engines)},
            "bundles": [str(b) for b in bundles],
            "faces": {s.key: len(f) for s, f in sample}, "out": out}
    if dry_run:
        click.echo(json.dumps(plan, indent=1))
        return
    if platform.machine() != "x86_64":
        raise ArmError("the check emulates aarch64 on an x86_64 host")
    if os.geteuid() != 0:
        raise ArmError("the check needs root (debootstrap, chroot, a private mount namespace)")
    check_tools(install_tools, log)
    out = Path(out)
    t0 = time.perf_counter()
    with Binfmt():
        root = build_root(Path(cache), log)
        envs = venvs(root, cpu, engines, log)
        work = root / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(REPO / "runtime", work / "runtime",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copy(REPO / "benchmark" / "arm" / "device_eval.py", work / "device_eval.py")
        crops, mats, by_pre = {}, {}, {}
        for b, m in metas.items():
            name = f"{b.parent.name}__{b.name}"
            shutil.copytree(b, work / "bundles" / name)
            key = json.dumps(m.preprocess.to_meta(), sort_keys=True)   # one batch per rule
            if key not in by_pre:
                by_pre[key] = (f"pre{len(by_pre)}", *crops_for(m, sample))
            tag, crops[name], mats[b] = by_pre[key]
            (work / "bundles" / name / "crops.key").write_text(tag)
        np.savez(work / "crops.npz", **{t: x for t, x, _ in by_pre.values()})
        arm = run_bundles(root, cpu, envs, metas, Path(cache) / "results", log)
        machine = in_root(root, cpu, "uname -m && python3 --version && ldd --version | head -1"
                          ).stdout.split()
    report = compare(metas, mats, crops, arm, sample, cpu, budget, machine)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    report["plan"] = plan
    write(out, report, log)
    bad = [r for r in report["rows"] if r["status"] != "ok"]
    failed = [f"{r['model']}/{r['bundle']}" for r in report["rows"] if r["verdict"] == "fail"]
    log(f"done in {report['wall_s']:.0f} s: {len(report['rows'])} bundles, "
        f"{len(bad)} that do not run on aarch64")
    if failed:
        raise click.ClickException(
            f"{len(failed)} bundle(s) that do not exclude aarch64 failed there or missed the "
            f"{budget} INT8 drift budget: {', '.join(failed)} (see {out / 'results.md'})")


def _result_key(meta, cpu: str) -> str:
    """A bundle's ARM result is reused while the bundle, the runtime code, the face sample,
    the CPU model and the way the root is set up for its engine are the same."""
    h = hashlib.sha256(f"{meta.sha256}|{cpu}|{SETS}".encode()
                       + (b"|sysfs" if meta.engine == "openvino" else b""))
    for p in sorted((REPO / "runtime").glob("*.py")) + [REPO / "benchmark" / "arm" / "device_eval.py"]:
        h.update(p.read_bytes())
    return h.hexdigest()[:24]


def run_bundles(root: Path, cpu: str, envs: dict, metas: dict, results: Path, log) -> dict:
    """Each bundle in its own emulated process (a crash is that bundle's finding, not the
    run's end), results cached under `results` by _result_key."""
    results.mkdir(parents=True, exist_ok=True)
    out = {}
    for b, m in metas.items():
        name = f"{b.parent.name}__{b.name}"
        cached = results / f"{_result_key(m, cpu)}.json"
        if cached.is_file():
            out[name] = json.loads(cached.read_text())
            log(f"aarch64 ({cpu}): {name}: {out[name]['status']} (cached)")
            continue
        log(f"aarch64 ({cpu}): {name} ...")
        try:
            in_root(root, cpu, f"cd /work && {envs[m.engine]}/bin/python device_eval.py crops.npz "
                               f"out.json bundles/{name}", timeout=1800,
                    sysfs=m.engine == "openvino")
            res = json.loads((root / "work" / "out.json").read_text())["bundles"][name]
        except ArmError as e:
            tail = str(e).splitlines()[1:]
            res = {"status": "error", "reason": "the process died on aarch64: "
                   + " | ".join(t.strip() for t in tail if t.strip())[-400:]}
        except subprocess.TimeoutExpired:
            res = {"status": "error", "reason": "timed out on aarch64 (30 min)"}
        cached.write_text(json.dumps(res))
        log(f"      {res['status']} {res.get('reason', '')[:120]}")
        out[name] = res
    return out


def compare(metas, mats, crops, arm, sample, cpu, budget, machine) -> dict:
    """Score ARM and x86 outputs of every bundle on the same crops; drift against the model's
    FP32 reference bundle on ARM and point shift against the same bundle on x86."""
    from benchmark import records as R
    from runtime.decode import Landmarker
    rows, by_model = [], {}
    for b, m in metas.items():
        name = f"{b.parent.name}__{b.name}"
        x = crops[name]
        lm = Landmarker.open(b, threads=1, precision="f32")
        x86 = {o.scheme: Landmarker(lm.meta, lm.engine, i)(x) for i, o in enumerate(m.outputs)}
        a = arm.get(name, {"status": "error", "reason": "not run"})
        row = {"model": b.parent.name, "bundle": b.name, "backend": m.engine,
               "precision": m.precision, "device": f"aarch64, emulated {cpu}",
               "status": a["status"], "reason": a.get("reason", ""),
               "latency": None, "latency_note": "emulated: not meaningful",
               "exec_precision": {"hint": "default", "actual": a.get("exec_precision")}}
        if a["status"] == "ok":
            acc_arm, acc_x86, shift = {}, {}, {}
            for i, o in enumerate(m.outputs):
                ya = np.asarray(a["outputs"][o.scheme], np.float32)
                sa = score(m, i, ya, mats[b], sample)
                sx = score(m, i, x86[o.scheme], mats[b], sample)
                for k in sa:
                    d = np.linalg.norm(sa[k].pop("_points") - sx[k].pop("_points"), axis=-1)
                    shift[k] = float(d.mean(-1).mean())
                acc_arm.update(sa)
                acc_x86.update(sx)
            row["accuracy"] = {k: R.accuracy_entry(
                {**v, "fr_0.10": v["fr_0.10"], "auc_0.10": v["auc_0.10"]}) for k, v in acc_arm.items()}
            row["nme_x86"] = {k: v["nme"] for k, v in acc_x86.items()}
            row["shift_vs_x86_px"] = shift
            row["max_shift_vs_x86_px"] = max(shift.values())
        rows.append(row)
        by_model.setdefault(b.parent.name, {})[b.name] = row
    bundle_of = {(b.parent.name, b.name): b for b in metas}
    for model, rs in by_model.items():            # INT8 drift on ARM
        ref = next((rs[s] for s in ("onnx_sim_fp32", "onnx_fp32", "tflite_fp32") if s in rs
                    and rs[s]["status"] == "ok"), None)
        for r in rs.values():
            if r["status"] != "ok" or r["precision"] != "int8":
                continue
            if ref is not None:
                r["drift_arm_sample_points"] = {
                    k: (v["nme"] - ref["accuracy"][k]["nme"]) * 100
                    for k, v in r["accuracy"].items() if k in ref["accuracy"]}
                r["drift_reference"] = ref["bundle"]
            x86 = x86_drift(bundle_of[model, r["bundle"]])
            if x86 is not None:
                r["drift_x86_points"] = x86
                r["arm_effect_points"] = {k: (v["nme"] - r["nme_x86"][k]) * 100
                                          for k, v in r["accuracy"].items()}
                r["drift_arm_points"] = {k: d + r["arm_effect_points"].get(_sampled(k), 0.0)
                                         for k, d in x86.items()}
                r["drift_basis"] = ("x86 drift on all WFLW evaluation faces (quantize report) "
                                    "+ the ARM effect on the same bundle, paired on the sample")
            elif ref is not None:
                r["drift_arm_points"] = r["drift_arm_sample_points"]
                r["drift_basis"] = "INT8 against FP32 on ARM, on the sample (no quantize report)"
            else:
                continue
            gated = {k: v for k, v in r["drift_arm_points"].items() if k.startswith("wflw:test/")}
            r["within_budget_on_arm"] = all(abs(v) <= budget for v in gated.values())
    for b, m in metas.items():
        verdict(by_model[b.parent.name][b.name], m)
    return {"created": __import__("common").now(), "cpu": cpu, "machine": machine,
            "host": __import__("common").host_string(__import__("common").host_info()),
            "budget_points": budget, "rows": rows}


def x86_drift(bundle: Path) -> dict | None:
    """An INT8 bundle's drift in NME points on x86 over all WFLW evaluation faces, per gated
    set and head figure, from the quantize report beside it (None without one)."""
    path = bundle.parent / "quantize_report.json"
    if not path.is_file():
        return None
    for be in json.loads(path.read_text()).get("backends", {}).values():
        if be.get("status") == "ok" and Path(be.get("int8_bundle") or "").name == bundle.name:
            return {k: (v["int8"]["nme"] - v["fp32"]["nme"]) * 100 for k, v in be["nme"].items()
                    if k.startswith("wflw:test/") and "int8" in v and "fp32" in v}
    return None


def _sampled(key: str) -> str:
    """The sample figure whose ARM effect stands for a gated set: the rect crops of the
    evaluation faces, with the same head ("@68" or not)."""
    return "wflw:test/rect" + ("@68" if key.endswith("@68") else "")


def verdict(row: dict, meta) -> None:
    """What the run says about a bundle's claim: one that does not exclude aarch64 (meta
    `architectures`) must run there and, if INT8, keep its drift on ARM within the budget
    ("fail" otherwise); one declared for other machines is "x86-only as declared" whatever
    happened, and "declared x86-only, yet runs" when it ran within budget."""
    claims = meta.architectures is None or "aarch64" in meta.architectures
    ok = row["status"] == "ok" and row.get("within_budget_on_arm", True)
    if claims:
        row["verdict"] = "pass" if ok else "fail"
    else:
        archs = "/".join(meta.architectures)
        row["verdict"] = (f"declared {archs} only, yet runs within budget" if ok
                          else f"{archs} only, as declared")


def write(out: Path, report: dict, log) -> None:
    from benchmark import records as R
    from runtime.bundle import atomic_write_json, atomic_write_text
    (out / "records").mkdir(parents=True, exist_ok=True)
    for r in report["rows"]:
        rec = {"schema": R.SCHEMA, "id": R.record_id(r["model"], r["bundle"], r["device"], 1,
                                                     "default"), "created": report["created"],
               "host": report["host"], **r}
        R.write_record(out / "records", rec)
    atomic_write_json(out / "arm_report.json", report)
    lines = [f"# {report['rows'][0]['device']}: every bundle against x86", "",
             f"{report['created']}, {' '.join(report['machine'])}; host {report['host']}", "",
             "INT8 drift on ARM: the bundle's drift on x86 over all WFLW evaluation faces, both "
             "protocols and heads (its quantize report), plus what ARM changes in the same "
             "bundle's NME, paired on the sample's rect crops (each head); the worst gated set. "
             "Sample: INT8 against FP32, both on ARM, sample faces only (noisier).", "",
             "| model | bundle | status | WFLW eval rect NME (x86) | HELEN NME (x86) | max shift vs x86 px "
             "| ARM effect, pp | INT8 drift on ARM, pp (sample) | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]

    def worst(d):      # the largest |drift| over the gated sets, signed
        v = max((v for k, v in (d or {}).items() if k.startswith("wflw:test/")), key=abs,
                default=None)
        return "-" if v is None else f"{v:+.3f}"
    for r in report["rows"]:
        if r["status"] != "ok":
            why = " ".join(r["reason"].split()).replace("|", "/")
            lines.append(f"| {r['model']} | {r['bundle']} | **does not run**: {why[-150:]} "
                         f"| | | | | {r['verdict']} |")
            continue
        a, x = r["accuracy"], r["nme_x86"]
        f = lambda k: f"{a[k]['nme'] * 100:.2f} ({x[k] * 100:.2f})" if k in a else "-"   # noqa: E731
        drift = worst(r.get("drift_arm_points"))
        if r.get("drift_arm_sample_points") and r.get("drift_x86_points"):
            drift += f" ({worst(r['drift_arm_sample_points'])})"
        lines.append(f"| {r['model']} | {r['bundle']} | ok | {f('wflw:test/rect')} | "
                     f"{f('300w:helen_test/landmarks')} | {r['max_shift_vs_x86_px']:.3f} | "
                     f"{worst(r.get('arm_effect_points'))} | {drift} | {r['verdict']} |")
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    log(f"wrote {out / 'arm_report.json'}, {out / 'results.md'}")
    click.echo("\n".join(lines))


if __name__ == "__main__":
    main()
