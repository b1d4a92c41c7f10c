"""runtime.bundle.BundleMeta: bundles written before the type (schema 1) still load, every field
round-trips, and a malformed meta.json fails with the file and the key."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import identity_onnx

from runtime.bundle import META, SCHEMA_VERSION, BundleError, BundleMeta, OutputSpec
from runtime.decode import Landmarker
from runtime.preprocess import Preprocess

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["meta_v1_onnx_sim_fp32.json", "meta_v1_onnx_int8.json"])
def test_schema_1_meta_from_the_previous_export_loads(name):
    """Kept verbatim from a `make export` / `make quantize` run before the type existed."""
    raw = json.loads((FIXTURES / name).read_text())
    assert raw["format_version"] == 1 and "outputs" not in raw
    meta = BundleMeta.from_json(FIXTURES / name)
    assert meta.outputs == [OutputSpec("points", "points", "300w68")]
    assert meta.scheme == raw["scheme"] and meta.outputs[0].num_points == raw["num_points"]
    assert meta.preprocess == Preprocess()            # 112, RGB, 127.5/127.5, crop 1.2
    assert meta.lineage.stage == raw["stage"] and meta.lineage.parent == raw["parent"]
    assert meta.lineage.source_checkpoint == raw["source_checkpoint"]
    assert meta.files["model.onnx"].sha256 == raw["files"]["model.onnx"]["sha256"]
    assert meta.validation == raw["validation"] and meta.input.shape == raw["input"]["shape"]
    # written again, it is a schema-2 file that loads to the same description
    again = BundleMeta.from_dict(json.loads(json.dumps(meta.to_dict())))
    assert again == meta and meta.to_dict()["schema_version"] == SCHEMA_VERSION


def test_round_trip_and_output_choice(tmp_path):
    identity_onnx(tmp_path / "model.onnx")
    meta = BundleMeta("two_heads", "onnxruntime", "fp32", BundleMeta.files_of("model.onnx"),
                      Preprocess(color="BGR"), [OutputSpec("points_300w68", scheme="300w68"),
                                                OutputSpec("points_wflw98", scheme="wflw98", index=1)])
    meta.write(tmp_path)
    back = BundleMeta.load(tmp_path)
    assert back == meta
    assert back.files["model.onnx"].bytes == (tmp_path / "model.onnx").stat().st_size
    assert back.output(98).name == "points_wflw98" == back.output("wflw98").name
    assert back.output(1).scheme == "wflw98" and back.output().scheme == "300w68"
    with pytest.raises(BundleError, match="no output 5"):
        back.output(5)


def _bad(tmp_path, fixture, edit):
    d = tmp_path / "b"
    d.mkdir(exist_ok=True)
    raw = json.loads((FIXTURES / fixture).read_text())
    edit(raw)
    (d / META).write_text(json.dumps(raw))
    with pytest.raises(BundleError) as e:
        BundleMeta.load(d, verify=False)
    return str(e.value)


@pytest.mark.parametrize("edit, needle", [
    (lambda r: r.pop("engine"), "lacks the key 'engine'"),
    (lambda r: r.update(precision="int4"), "precision 'int4'"),
    (lambda r: r.update(files={}), "'files' names no model file"),
    (lambda r: r["files"].update({"x.bin": {"sha256": 3}}), "files['x.bin']"),
    (lambda r: r.update(scheme="dlib5"), "unknown landmark scheme 'dlib5'"),
    (lambda r: r["preprocess"].update(color="YUV"), "key 'preprocess'"),
    (lambda r: r.update(format_version=7), "schema_version 7"),
    (lambda r: r["input"].update(layout="CHWN"), "input.layout"),
])
def test_malformed_meta_names_the_file_and_the_key(tmp_path, edit, needle):
    msg = _bad(tmp_path, "meta_v1_onnx_sim_fp32.json", edit)
    assert needle in msg and str(tmp_path / "b" / META) in msg


def test_malformed_schema_2_outputs(tmp_path):
    meta = BundleMeta.from_json(FIXTURES / "meta_v1_onnx_sim_fp32.json").to_dict()
    d = tmp_path / "b"
    d.mkdir()
    for change, needle in [({"kind": "mesh"}, "outputs[0]: kind 'mesh'"),
                           ({"units": "inches"}, "outputs[0]: units 'inches'"),
                           ({"index": -1}, "outputs[0]: index")]:
        raw = json.loads(json.dumps(meta))
        raw["outputs"][0].update(change)
        (d / META).write_text(json.dumps(raw))
        with pytest.raises(BundleError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            BundleMeta.load(d, verify=False)
    (d / META).write_text("{not json")
    with pytest.raises(BundleError, match="is not valid JSON"):
        BundleMeta.load(d, verify=False)


def test_decoder_is_chosen_from_the_description(tiny_bundle):
    """An output described as pixels, all x then all y, decodes to the same points."""
    import numpy as np

    from runtime.decode import PointsDecoder
    lm = Landmarker.open(tiny_bundle)
    x = np.random.default_rng(0).normal(size=(2, 3, 112, 112)).astype(np.float32)
    y = lm(x)
    k = lm.out.num_points
    raw = (y.reshape(2, k, 2).transpose(0, 2, 1).reshape(2, -1)) * 112
    dec = PointsDecoder(OutputSpec(scheme=lm.out.scheme, units="pixels", order="xxyy"), 112)
    assert np.allclose(dec(raw), y, atol=1e-5)
    with pytest.raises(ValueError, match="values per face"):
        dec(raw[:, :10])


def test_architectures_a_bundle_declares_are_enforced(tmp_path):
    identity_onnx(tmp_path / "model.onnx")
    meta = BundleMeta("m", "openvino", "int8", BundleMeta.files_of("model.onnx"), Preprocess(),
                      [OutputSpec()], architectures=["x86_64"],
                      quantization={"architectures_note": "NNCF's per-channel INT8 IR does not "
                                                          "load on the ARM CPU plugin"})
    meta.write(tmp_path)
    back = BundleMeta.load(tmp_path)
    assert back.architectures == ["x86_64"]
    back.check_machine("x86_64")
    with pytest.raises(BundleError, match="runs on x86_64 only, not on aarch64: NNCF"):
        back.check_machine("aarch64")
    raw = json.loads((tmp_path / META).read_text())
    raw["architectures"] = "x86_64"
    (tmp_path / META).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="key 'architectures' must be a list"):
        BundleMeta.load(tmp_path, verify=False)
