"""A training checkpoint as a type: the one module that loads, validates, saves and describes
the .pt files train/run.py fit, train/ship.py, train/soup.py and refit-head write (models/*.pt).
On disk a checkpoint stays the dict it always was ("arch", "scheme", "preprocess", "model", and
the training record); `Checkpoint` is a typed view of it whose answers about the network (its
outputs, point schemes, builder) come from its model family (train/family.py), so no stage
indexes `ck["arch"][...]` by hand or asks which family it is:

    from train.checkpoint import Checkpoint
    ck = Checkpoint.load("models/student_w05.pt")
    ck.family.name, ck.scheme, ck.heads     # "pfld", "300w68", ["300w68", "wflw98"]
    ck.outputs()                             # the OutputSpecs an exported bundle records
    model = ck.build()                       # eval-mode network with the weights loaded
    ck.preprocess                            # runtime.preprocess.Preprocess

`load_checkpoint` / `save_checkpoint` / `model_from_checkpoint` work on the raw dict (train.engine
re-exports them); `ck.raw` is that dict for code that needs the training record.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.bundle import atomic_write_bytes
from runtime.errors import ConfigError
from runtime.preprocess import Preprocess
from train.family import Family, family_of

REQUIRED = ("arch", "model", "scheme", "preprocess")   # the keys every checkpoint has


def save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _check_keys(ck, where) -> None:
    for key in REQUIRED:
        if not isinstance(ck, dict) or key not in ck:
            raise ConfigError(f"{where} is not a landmark checkpoint of this project (no {key!r})")


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise ConfigError(f"{path} is not a readable checkpoint: {e}") from None
    _check_keys(ck, path)
    return ck


def model_from_checkpoint(ck: dict | Checkpoint):
    """The eval-mode network of a checkpoint (its family's builder, its weights loaded)."""
    if isinstance(ck, Checkpoint):
        ck = ck.raw
    m = family_of(ck["arch"]).build(ck["arch"])
    try:
        m.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise ConfigError(f"checkpoint weights do not fit the PFLD architecture {ck['arch']}: "
                         f"{str(e).splitlines()[0]}") from None
    return m.eval()


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: `raw` is the dict on disk, `path` where it came from (if a file)."""
    raw: dict
    path: Path | None = None

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        """FileNotFoundError, or ConfigError for a file that is not a checkpoint of this project."""
        return cls(load_checkpoint(path), Path(path))

    @classmethod
    def from_dict(cls, ck: dict, path: str | Path | None = None) -> Checkpoint:
        _check_keys(ck, path or "the checkpoint")
        return cls(ck, Path(path) if path is not None else None)

    def save(self, path: str | Path) -> None:
        save_checkpoint(Path(path), self.raw)

    # -- the network ---------------------------------------------------------------------------
    @property
    def arch(self) -> dict:
        """The network's arch dict (family.build(arch) makes it)."""
        return self.raw["arch"]

    @property
    def family(self) -> Family:
        """Its model family (UnknownNameError for one no module registers)."""
        return family_of(self.arch)

    @property
    def scheme(self) -> str:
        """The point scheme of its labelled training faces (and of a single-output network)."""
        return self.raw["scheme"]

    @property
    def named_heads(self) -> list[str]:
        """The point scheme of each named head (a PFLD trained with --heads); [] otherwise."""
        return self.family.named_heads(self.arch)

    @property
    def heads(self) -> list[str]:
        """The point scheme of each output, in output order."""
        return self.named_heads or [self.scheme]

    @property
    def output_names(self) -> list[str]:
        """The network's outputs (forward_heads keys), in order: one per head, ["points"] or
        ["heatmaps"]."""
        return self.family.output_names(self.arch)

    @property
    def num_points(self) -> int:
        """Points a single-output network predicts per face (a network with named heads: see
        `heads`)."""
        return int(self.arch["num_points"])

    @property
    def width(self):
        """The width multiplier, as stored."""
        return self.arch["width"]

    @property
    def input_size(self) -> int:
        return int(self.arch.get("input_size", 112))

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_dict(self.raw["preprocess"])

    @property
    def weights(self) -> dict:
        """The state dict of the network (the weights that were scored)."""
        return self.raw["model"]

    @property
    def config(self) -> dict:
        """The training run's TrainConfig as saved ({} for a checkpoint without one)."""
        return self.raw.get("config") or {}

    def outputs(self, model=None) -> list:
        """One runtime.bundle.OutputSpec per output: what an exported bundle records. `model`:
        the built network, if at hand (else the family builds one where it needs to)."""
        return self.family.describe_outputs(self.arch, self.scheme, model)

    def build(self):
        """The eval-mode network with the weights loaded (ConfigError if they do not fit)."""
        return model_from_checkpoint(self.raw)

    def with_decoder(self, settings: dict | None) -> Checkpoint:
        """This checkpoint with decoder settings (e.g. {"decoder": "argmax_quarter"} or
        {"window": 3}) in place of its own: the decoding ablation. A family without decoder
        settings (PFLD) ignores them; a key its family does not take is a ConfigError."""
        allowed = self.family.decoder_settings
        if not settings or not allowed:
            return self
        bad = [k for k in settings if k not in allowed]
        if bad:
            raise ConfigError(f"decoder setting {', '.join(bad)}: a {self.family.name} network "
                              f"takes {', '.join(allowed)}")
        return Checkpoint({**self.raw, "arch": {**self.arch, **settings}}, self.path)
