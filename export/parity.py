"""The parity check of a freshly converted bundle: `parity_faces` cuts the fixed batch of
real faces (PARITY_SETS), `parity` runs the new bundle through the runtime's engines and
decoders next to its reference (the target it is checked against, or the source) and raises
ExportError when any output differs by more than the target's tolerance, and `_match_outputs`
maps the source's outputs onto the converted file's. export.stages calls them for every
bundle it builds; the returned record becomes the bundle's meta.json "validation".
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from export.base import (HEATMAP_RAW_FACTOR, PARITY_SETS, SOURCE, ExportError, ExportInputError, Job,
                         Target, _run_bundle)
from runtime.bundle import BundleMeta, OutputSpec
from runtime.preprocess import Preprocess


def _match_outputs(job: Job, target: Target, spec: dict) -> list[OutputSpec]:
    """The source's output descriptions with each one's index in the new file and its name
    there. ONNX and OpenVINO keep the output order; LiteRT may not, so an output there is found
    by its size (2K values per face), which differs between heads of different schemes."""
    outs = job.source.outputs
    names = spec["outputs"]
    if len(names) < max(o.index for o in outs) + 1:
        raise ExportError(f"{target.name}: the converted model has {len(names)} output(s), the "
                          f"source {len(outs)}")
    if target.engine != "tflite" or len(outs) == 1:
        return [replace(o, name=names[o.index]) for o in outs]
    from ai_edge_litert.interpreter import Interpreter
    sizes = [int(np.prod(d["shape"][1:])) for d in
             Interpreter(model_path=str(spec["_folder"] / spec["files"][0])).get_output_details()]
    out = []
    for o in outs:
        hits = [i for i, s in enumerate(sizes) if s == 2 * o.num_points]
        if len(hits) != 1:
            raise ExportError(f"{target.name}: cannot tell which output is {o.scheme} "
                              f"(output sizes {sizes})")
        out.append(replace(o, name=names[hits[0]], index=hits[0]))
    return out


def parity(job: Job, target: Target, meta: BundleMeta) -> dict:
    """Run the new bundle and its reference on the parity faces, every output decoded to
    points; ExportError if any output is over the tolerance."""
    ref_name = target.checked_against
    if ref_name is not None and ref_name not in job.bundles:
        ref_name = None      # the reference target was skipped: check against the source
    ref, ref_raw = job.points_of(ref_name), job.raw_of(ref_name)
    got, got_raw = _run_bundle(meta.folder, job.faces, meta)
    diffs, bad = {}, []
    for o, a, b, ra, rb in zip(meta.outputs, got, ref, got_raw, ref_raw):
        if a.shape != b.shape:
            raise ExportError(f"{target.name}: output '{o.name}' gives {a.shape}, its reference "
                              f"{ref_name or SOURCE} gives {b.shape}")
        d = np.abs(a.astype(np.float64) - b)
        diffs[o.name] = {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean())}
        if o.kind != "heatmaps":
            if not d.max() <= target.tolerance:
                bad.append(f"output '{o.name}': max |diff| {d.max():.3e} (mean {d.mean():.1e}); "
                           f"tolerance {target.tolerance:.0e} on crop-normalised coordinates")
            continue
        # heatmaps: the maps themselves must agree to the tolerance (values in [0, 1]); the
        # decoded points on average too, and each within one heatmap pixel: where two pixels
        # of a map nearly tie, reduced precision may pick the other argmax and the local window
        # moves with it (a sub-pixel change of the point, not a defect of the conversion)
        if ra.shape != rb.shape:
            raise ExportError(f"{target.name}: output '{o.name}' gives maps of {ra.shape}, its "
                              f"reference {rb.shape}")
        dr = np.abs(ra.astype(np.float64) - rb)
        one_px = o.params["stride"] / job.source.preprocess.input_size
        diffs[o.name].update(raw_max_abs_diff=float(dr.max()), raw_mean_abs_diff=float(dr.mean()),
                             points_max_allowed=one_px)
        if not dr.max() <= target.tolerance * HEATMAP_RAW_FACTOR:
            bad.append(f"output '{o.name}': heatmaps max |diff| {dr.max():.3e} > "
                       f"{target.tolerance * HEATMAP_RAW_FACTOR:.0e}")
        if not (d.mean() <= target.tolerance and d.max() <= one_px):
            bad.append(f"output '{o.name}': decoded points mean |diff| {d.mean():.1e} (limit "
                       f"{target.tolerance:.0e}), max {d.max():.3e} (limit one heatmap pixel, "
                       f"{one_px:.3e}) on crop-normalised coordinates")
    if bad:
        raise ExportError(
            f"{target.name}: parity check against {ref_name or 'the source model'} failed on "
            f"{len(job.faces)} real faces: {'; '.join(bad)}. The artifact was not written.")
    worst = max(v["max_abs_diff"] for v in diffs.values())
    return {"checked_against": _ref_record(job, ref_name), "engine": target.engine,
            "execution_precision": "f32", "faces": len(job.faces), "face_sets": job.face_sets,
            "outputs": diffs, "max_abs_diff": worst,
            "max_abs_diff_crop_px": worst * job.source.preprocess.input_size,
            "tolerance": target.tolerance, "passed": True}


def _ref_record(job: Job, name: str | None) -> dict:
    if name is None:
        engine = "torch" if job.source.kind == "checkpoint" else job.source.spec["engine"]
        return {"target": SOURCE, "path": None, "sha256": job.source.sha, "engine": engine}
    meta = BundleMeta.load(job.bundles[name], verify=False)
    return {"target": name, "path": f"../{job.bundles[name].name}", "sha256": meta.sha256,
            "engine": meta.engine}


def parity_faces(pre: Preprocess) -> tuple[np.ndarray, dict[str, int]]:
    """A fixed batch of real faces (PARITY_SETS: every n-th face of each set)."""
    from evaluation.data import DataError
    from evaluation.metrics import face_batch
    from evaluation.sets import scored_set
    parts, counts = [], {}
    try:
        for key, n in PARITY_SETS:
            s = scored_set(key)
            faces = s.faces()
            faces = faces[::max(1, len(faces) // n)][:n]
            parts.append(face_batch(faces, pre, s.protocol))
            counts[key] = len(faces)
    except DataError as e:
        raise ExportInputError(f"the parity check needs real faces: {e}") from None
    return np.concatenate(parts), counts
