"""The model-family registry (timm's `register_model` / `create_model`): every network family
the pipeline trains, exports and benchmarks is one `Family` entry holding its builder, its
output names and descriptions, its decoder, its training-time builder and loss, and what it
can do (`multi_head`, `decoder_settings`), so no stage branches on a family's name. A family
registers itself in its own module (`pfld` in train/model.py, `heatmap` in train/heatmap.py)
with `register_family(Family(...))`; those modules are imported lazily on the first lookup, so
this module imports neither and there is no import circle. Look a family up by name, arch
dict, checkpoint or network:

    from train.family import FAMILIES, family_of
    fam = family_of(ck["arch"])          # an arch without a "family" key is a PFLD
    model = fam.build(ck["arch"]); fam.describe_outputs(ck["arch"], ck["scheme"], model)
    list(FAMILIES)                       # ["pfld", "heatmap"]: e.g. a CLI's choices

A checkpoint's reader (train/checkpoint.py: `Checkpoint`) answers the same through its family.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable

from runtime.errors import UnknownNameError

DEFAULT_FAMILY = "pfld"                        # the family of an arch without a "family" key
FAMILY_MODULES = ("train.model", "train.heatmap")   # where the families register


def _no_decoder(model) -> None:
    return None


@dataclass(frozen=True)
class Family:
    """One model family. `arch` is the dict every checkpoint stores (the network's `.arch`),
    `cfg` a train.engine.TrainConfig, `heads` the run's point schemes (one per output)."""
    name: str
    summary: str                          # one line: what it is (a CLI's help)
    build: Callable[[dict], Any]          # arch -> the network (fresh weights)
    output_names: Callable[[dict], list[str]]   # arch -> the network's outputs, in order
    # arch -> point scheme of each named head; [] when the network has one unnamed output
    # (whose scheme is the checkpoint's "scheme")
    named_heads: Callable[[dict], list[str]]
    # (arch, scheme, network or None) -> one runtime.bundle.OutputSpec per output: what an
    # exported bundle records and the benchmark plans with
    describe_outputs: Callable[[dict, str, Any], list]
    build_for_training: Callable[[Any, list[str]], Any]   # (cfg, heads) -> network, --init loaded
    # (cfg, model, heads, x, targets, pose, attrs) -> (loss, mean point error or 0.0)
    loss: Callable[..., tuple]
    # network -> numpy decoder of its first output into (N, 2K) points; None: the outputs are
    # points already
    decoder: Callable[[Any], Callable | None] = _no_decoder
    multi_head: bool = False              # one network can carry several point-scheme heads
    decoder_settings: tuple[str, ...] = ()   # arch keys a decoder override may set (evaluation)


_REGISTERED: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add `family` to the registry (called by the module that defines it); returns it."""
    old = _REGISTERED.get(family.name)
    if old is not None and old.build.__module__ != family.build.__module__:
        raise ValueError(f"model family {family.name!r} is registered twice "
                         f"({old.build.__module__} and {family.build.__module__})")
    _REGISTERED[family.name] = family
    return family


def _load_families() -> dict[str, Family]:
    """The registry, after importing every module that registers a family."""
    for module in FAMILY_MODULES:
        importlib.import_module(module)
    return _REGISTERED


class _Families(Mapping):
    """FAMILIES: name -> Family, loading the families' modules on first access."""

    def __getitem__(self, name: str) -> Family:
        return family_of(name)

    def __iter__(self) -> Iterator[str]:
        return iter(_load_families())

    def __len__(self) -> int:
        return len(_load_families())

    def __repr__(self) -> str:
        return f"FAMILIES({', '.join(self)})"


FAMILIES: Mapping[str, Family] = _Families()


def family_name(arch: Mapping) -> str:
    """The family an arch dict names (without loading any family)."""
    return str(arch.get("family", DEFAULT_FAMILY))


def is_family(arch: Mapping, family: Family) -> bool:
    """Whether an arch dict describes a network of `family` (without loading any family)."""
    return family_name(arch) == family.name


def family_of(arch_or_checkpoint) -> Family:
    """The Family of a name, an arch dict, a checkpoint (dict or train.checkpoint.Checkpoint)
    or a network (anything with an `.arch` dict). UnknownNameError for an unknown family."""
    x = arch_or_checkpoint
    if isinstance(x, str):
        name = x
    else:
        arch = getattr(x, "arch", x)
        if isinstance(arch, Mapping) and isinstance(arch.get("arch"), Mapping):
            arch = arch["arch"]              # a checkpoint dict
        if not isinstance(arch, Mapping):
            raise TypeError(f"family_of takes a family name, an arch dict, a checkpoint or a "
                            f"network, not {type(x).__name__}")
        name = family_name(arch)
    families = _load_families()
    if name not in families:
        raise UnknownNameError(f"unknown model family {name!r}; known: {', '.join(families)}")
    return families[name]
