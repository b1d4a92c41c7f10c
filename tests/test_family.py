"""The model-family registry (train/family.py) and the typed checkpoint (train/checkpoint.py):
every registered family builds, names and describes its outputs consistently; the shipped
checkpoints describe the outputs their exports record; no model <-> heatmap import circle."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.bundle import OutputSpec
from runtime.errors import ConfigError, UnknownNameError
from runtime.schemes import get_scheme
from train.checkpoint import Checkpoint
from train.family import FAMILIES, family_of

REPO = Path(__file__).resolve().parents[1]

# every registered family needs at least one case here (test_every_family_has_a_case)
CASES = {
    "pfld": [{"num_points": 68, "width": 0.25, "input_size": 112},
             {"heads": {"300w68": 68, "wflw98": 98}, "width": 0.25, "input_size": 112}],
    "heatmap": [{"family": "heatmap", "num_points": 68, "width": 0.25, "input_size": 112}],
}


def test_every_family_has_a_case():
    assert set(FAMILIES) == set(CASES), "add a CASES entry for every registered family"


@pytest.mark.parametrize("name,arch", [(n, a) for n, archs in CASES.items() for a in archs])
def test_family_builds_names_and_describes_its_outputs(name, arch):
    from train.engine import torch_predictor
    fam = FAMILIES[name]
    assert family_of(arch) is fam and fam.name == name
    torch.manual_seed(0)
    model = fam.build(arch).eval()
    assert family_of(model) is fam and fam.build(model.arch).arch == model.arch
    x = torch.zeros(2, 3, 112, 112)
    with torch.no_grad():
        y = model(x)
        heads = model.forward_heads(x)
    outs = y if isinstance(y, tuple) else (y,)
    names = fam.output_names(arch)
    assert list(heads) == names and len(outs) == len(names)
    specs = fam.describe_outputs(arch, "300w68", model)
    assert len(specs) == len(outs) and all(isinstance(s, OutputSpec) for s in specs)
    assert [s.index for s in specs] == list(range(len(outs)))
    assert specs == fam.describe_outputs(arch, "300w68", None)    # without a built network
    assert [s.scheme for s in specs] == (fam.named_heads(arch) or ["300w68"])
    for s, out in zip(specs, outs):
        per_point = 2 if s.kind == "points" else 1                # heatmaps: one map a point
        assert out.shape[1] == per_point * get_scheme(s.scheme).num_points
    assert fam.multi_head or not fam.named_heads(arch)
    pts = torch_predictor(model)(x.numpy())                         # the family's decoder
    assert pts.shape == (2, 2 * get_scheme(specs[0].scheme).num_points)


SHIPPED = {   # what export (export.sources.checkpoint_source) recorded for them
    "student_w05.pt": [OutputSpec("points_300w68", "points", "300w68", index=0),
                       OutputSpec("points_wflw98", "points", "wflw98", index=1)],
    "pfld68_w05.pt": [OutputSpec("points", "points", "300w68")],
    "heatmap_w05.pt": None,            # one "heatmaps" output (params: its decoder's settings)
}


@pytest.mark.parametrize("file", list(SHIPPED))
def test_shipped_checkpoints_describe_what_export_records(file):
    from benchmark.torch_engine import checkpoint_meta
    from export.sources import checkpoint_source
    path = REPO / "models" / file
    ck = Checkpoint.load(path)
    model = ck.build()
    outputs = ck.outputs()
    if SHIPPED[file] is not None:
        assert outputs == SHIPPED[file]
    else:
        (o,) = outputs
        assert (o.name, o.kind, o.scheme, o.index) == ("heatmaps", "heatmaps", ck.scheme, 0)
        assert o.params == model.output_params() and o.params["window"] == ck.arch["window"]
    assert checkpoint_source(path).outputs == outputs == checkpoint_meta(path).outputs
    assert ck.heads == [o.scheme for o in outputs]
    assert ck.preprocess.input_size == ck.input_size == 112
    with torch.no_grad():
        y = model(torch.zeros(1, 3, ck.input_size, ck.input_size))
    assert len(y if isinstance(y, tuple) else (y,)) == len(ck.output_names) == len(outputs)


def test_unknown_family_names_the_known_ones():
    for lookup in (lambda: family_of("nope"), lambda: family_of({"family": "nope"}),
                   lambda: FAMILIES["nope"],
                   lambda: Checkpoint({"arch": {"family": "nope"}, "scheme": "300w68"}).family):
        with pytest.raises(UnknownNameError) as e:
            lookup()
        assert "nope" in str(e.value) and all(n in str(e.value) for n in FAMILIES)
    assert family_of({"num_points": 68, "width": 0.5}).name == "pfld"     # no key: PFLD


def test_decoder_override_only_where_the_family_takes_one():
    hm = Checkpoint.load(REPO / "models" / "heatmap_w05.pt")
    assert hm.with_decoder({"window": 3}).outputs()[0].params["window"] == 3
    with pytest.raises(ConfigError, match="sigma"):
        hm.with_decoder({"sigma": 2.0})
    pfld = Checkpoint.load(REPO / "models" / "pfld68_w05.pt")
    assert pfld.with_decoder({"window": 3}) is pfld


def test_pfld_builder_refuses_another_familys_arch():
    from train.model import build
    with pytest.raises(ConfigError, match="not a PFLD"):
        build(CASES["heatmap"][0])


def test_model_does_not_import_heatmap():
    p = subprocess.run([sys.executable, "-c",
                        "import train.model, sys; print('train.heatmap' in sys.modules)"],
                       cwd=REPO, capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "False"
