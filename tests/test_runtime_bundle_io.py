"""runtime/: bundles are readable by another user after a copy, and a fixed-batch .tflite
(what litert-torch writes) runs any batch through the LiteRT engine."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from runtime.bundle import BundleMeta, OutputSpec, atomic_write_json, staging_dir
from runtime.engines import LiteRTEngine
from runtime.preprocess import Preprocess
from train.engine import load_checkpoint, model_from_checkpoint
from evaluation.metrics import face_batch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_bundle_folder_and_files_get_the_usual_modes(tmp_path):
    # mkdtemp/mkstemp give 0700/0600; a device service user could not read such a bundle
    from conftest import identity_onnx
    with staging_dir(tmp_path / "b") as tmp:
        identity_onnx(tmp / "model.onnx")
        BundleMeta("b", "onnxruntime", "fp32", BundleMeta.files_of("model.onnx"), Preprocess(),
                   [OutputSpec()]).write(tmp)
    atomic_write_json(tmp_path / "report.json", {})
    mask = _umask()
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "b" / "meta.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_fixed_batch_tflite_runs_any_batch(tiny_checkpoint, wflw_faces, tmp_path):
    litert_torch = pytest.importorskip("litert_torch")
    if not LiteRTEngine.available()[0]:
        pytest.skip(LiteRTEngine.available()[1])
    ck = load_checkpoint(tiny_checkpoint)
    model = model_from_checkpoint(ck)
    x = face_batch(wflw_faces[:5], Preprocess.from_dict(ck["preprocess"]), "rect")
    litert_torch.convert(model, (torch.from_numpy(x[:1]),)).export(str(tmp_path / "m.tflite"))
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    engine = LiteRTEngine(tmp_path / "m.tflite")
    assert list(engine.inp["shape_signature"]) == [1, 3, 112, 112]   # batch baked in
    for n in (5, 1, 3):
        assert np.abs(engine(x[:n]) - ref[:n]).max() < 1e-4
