"""Model files carry their bundle's description in their own format's metadata (runtime.embedded):
it agrees with meta.json, and a bare .onnx / .xml / .tflite runs like its bundle folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from runtime.bundle import META, BundleError, BundleMeta
from common.embed import embed
from runtime.embedded import KEY, description, read_embedded


def _meta_json(folder: Path) -> dict:
    return json.loads((folder / META).read_text())


@pytest.mark.parametrize("target", ["onnx_fp32", "onnx_sim_fp32", "openvino_fp32",
                                    "openvino_fp16", "tflite_fp32", "tflite_fp16"])
def test_every_exported_file_carries_what_meta_json_says(exported, target):
    bundles, _ = exported
    folder = Path(bundles[target])
    meta = BundleMeta.load(folder)               # the sha256 check covers the embedding
    got = read_embedded(meta.model_file)
    assert got is not None, f"{meta.model_file} carries no {KEY}"
    assert got == description(_meta_json(folder))
    assert "files" not in got and "validation" not in got


@pytest.mark.parametrize("target", ["onnx_sim_fp32", "openvino_fp32", "tflite_fp32"])
def test_a_bare_model_file_runs_like_its_bundle(exported, target, wflw_faces, tmp_path):
    from runtime.decode import Landmarker
    bundles, _ = exported
    folder = Path(bundles[target])
    bare = tmp_path / target          # the model file(s) alone, without meta.json
    shutil.copytree(folder, bare)
    (bare / META).unlink()
    model_file = bare / next(iter(_meta_json(folder)["files"]))
    by_folder = Landmarker.open(folder)
    by_file = Landmarker.open(model_file)
    assert by_file.meta.preprocess == by_folder.meta.preprocess
    assert by_file.meta.outputs == by_folder.meta.outputs
    from runtime.preprocess import landmark_box
    batch = np.concatenate([by_folder.pre(f.image(), [landmark_box(f.points)], [0.0])[0]
                            for f in wflw_faces[:4]])
    assert np.allclose(by_file(batch), by_folder(batch), atol=1e-6)


def test_a_file_without_a_description_says_so(tiny_bundle, tmp_path):
    import onnx
    m = onnx.load(str(Path(tiny_bundle) / "model.onnx"))
    del m.metadata_props[:]
    onnx.save(m, str(tmp_path / "plain.onnx"))
    with pytest.raises(BundleError, match="carries no bundle description"):
        BundleMeta.load(tmp_path / "plain.onnx")


def test_the_device_reader_needs_no_onnx_package(tiny_bundle, monkeypatch):
    """runtime.embedded reads ONNX metadata from the protobuf bytes itself."""
    import sys
    monkeypatch.setitem(sys.modules, "onnx", None)          # import onnx fails
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert read_embedded(Path(tiny_bundle) / "model.onnx")["precision"] == "fp32"


def test_embedding_replaces_an_older_description(tiny_bundle, tmp_path):
    f = tmp_path / "m.onnx"
    shutil.copyfile(Path(tiny_bundle) / "model.onnx", f)
    embed(f, {"a": 1, "files": {}, "validation": {}})
    embed(f, {"a": 2})
    import onnx
    assert [p.key for p in onnx.load(str(f)).metadata_props].count(KEY) == 1
    assert read_embedded(f) == {"a": 2}
