"""Shared fixtures: real faces from ../shared, a tiny real PFLD checkpoint, the shipped model."""
from __future__ import annotations

from pathlib import Path

import pytest

from common import defaults

REPO = Path(__file__).resolve().parents[1]

SHIPPED = REPO / defaults.MODEL


@pytest.fixture(scope="session")
def wflw_faces():
    from evaluation.data import load_wflw
    return load_wflw()


@pytest.fixture(scope="session")
def helen_faces():
    from evaluation.data import load_300w
    return load_300w(split="helen_test")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A width-0.25, 68-point PFLD at the real input size, saved as a real checkpoint."""
    import torch

    from runtime.preprocess import Preprocess
    from train.engine import save_checkpoint
    from train.model import PFLD
    torch.manual_seed(0)
    m = PFLD(68, 0.25).eval()
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    save_checkpoint(path, {"arch": {"num_points": 68, "width": 0.25, "input_size": 112},
                           "scheme": "300w68", "preprocess": Preprocess().to_meta(),
                           "model": m.state_dict()})
    return path


@pytest.fixture(scope="session")
def shipped_checkpoint():
    """The committed trained model."""
    if not SHIPPED.is_file():
        pytest.fail(f"no trained model at {SHIPPED}")
    return SHIPPED


def export_onnx(checkpoint: Path, out: Path) -> Path:
    from export.stages import export_all
    return export_all(checkpoint, out, targets=["onnx_fp32"], progress=lambda s: None)["onnx_fp32"]


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory):
    """The tiny network as an onnx_fp32 bundle."""
    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("tiny_bundle") / "tiny")


@pytest.fixture(scope="session")
def exported(tiny_checkpoint, tmp_path_factory):
    """All six targets of the tiny network, exported once: ({target: folder}, progress lines)."""
    from export.stages import export_all
    lines = []
    out = tmp_path_factory.mktemp("export") / "tiny"
    return export_all(tiny_checkpoint, out, progress=lines.append), lines


def identity_onnx(path: Path) -> Path:
    """A real, minimal ONNX model file (one Identity node), for tests about bundle metadata."""
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["points"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("points", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(path))
    return path
