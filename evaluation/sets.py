"""Named evaluation sets, each with its crop protocols and titles, in one registry.

A set is named DATASET:PART, e.g. `wflw:test`; a scored set adds a crop protocol,
`wflw:test/rect`. Any folder of 300-W style `.pts` faces is a set too (`300w:/path/to/faces`),
and so is a folder in the official WFLW layout (`wflw:/path/to/WFLW`), so a user can score
their own faces with every CLI that takes `--eval-set`.

    faces = load_set("wflw:test")                 # list[evaluation.data.Face]
    for s in scored_sets(("wflw:test/rect", "300w:helen_test/landmarks")):
        s.key, s.title, s.protocol, s.scheme, s.faces()
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from evaluation import data as D
from evaluation.metrics import PROTOCOLS
from runtime.errors import LandmarkError


@dataclass(frozen=True)
class SetInfo:
    key: str
    title: str
    short: str
    scheme: str                          # annotation scheme of its faces
    protocols: tuple[str, ...]           # crop protocols it can be scored with
    load: Callable[[str | None], list[D.Face]] = field(compare=False, repr=False)
    description: str = ""


def _wflw_part(part: int | None):
    def load(root):
        faces = D.load_wflw(root, "test")
        return faces if part is None else D.calibration_split(faces)[part]
    return load


SETS: dict[str, SetInfo] = {s.key: s for s in [
    SetInfo("wflw:test", "WFLW test", "WFLW", "wflw98", ("rect", "landmarks"), _wflw_part(None),
            "every WFLW test face in the folder (505 in ../shared/wflw)"),
    SetInfo("wflw:eval", "WFLW eval", "WFLW", "wflw98", ("rect", "landmarks"), _wflw_part(1),
            "two thirds of the WFLW test faces: crc32(image path relative to WFLW_images/) % 3 != 0 "
            "(evaluation.data.calibration_split); the evaluation set of records made while INT8 "
            "calibrated on the other third, kept to read them (calibration now uses wflw:calib)"),
    SetInfo("wflw:calib", "WFLW calib", "WFLW cal", "wflw98", ("landmarks",),
            lambda root: D.wflw_calibration(root),
            "INT8 calibration faces: about 200 WFLW train faces training keeps (not wflw:heldout), "
            "crc32 of the path % 8 == 0 (evaluation.data.wflw_calibration); never a test face"),
    SetInfo("wflw:train", "WFLW train", "WFLW trn", "wflw98", ("landmarks",),
            lambda root: D.load_wflw(root, "train"),
            "every WFLW train face in the folder (1,825 in ../shared/wflw, real 98-point labels; "
            "its rectangle column is the landmark extent, so only the landmark crop); never a test set"),
    SetInfo("wflw:fit", "WFLW train faces kept", "WFLW fit", "wflw98", ("landmarks",),
            lambda root: D.wflw_train_split(root)[0],
            "the WFLW train faces training keeps (every train face but wflw:heldout; wflw:calib is "
            "a part of them): what quantization-aware training fine-tunes on; never a test set"),
    SetInfo("wflw:heldout", "WFLW held-out training faces", "WFLW held", "wflw98", ("landmarks",),
            lambda root: D.wflw_train_split(root)[1],
            "the WFLW train faces training holds out for model selection (crc32 of the image path "
            "relative to WFLW_images/, evaluation.data.wflw_train_split); never a test set"),
    SetInfo("300w:helen_test", "HELEN test", "HELEN", "300w68", ("landmarks",),
            lambda root: D.load_300w(root, "helen_test"), "300-W HELEN test faces (330)"),
    SetInfo("300w:common_test", "300-W common test", "300W cmn", "300w68", ("landmarks",),
            lambda root: D.load_300w(root, "common_test"), "300-W common test (the parts present)"),
    SetInfo("300w:heldout", "300-W held-out training faces", "300W held", "300w68", ("landmarks",),
            lambda root: D.holdout_split(D.load_300w(root, "train"), D.HELDOUT_FRACTION)[1],
            "the 300-W training faces training holds out for model selection (112 of 2,012, "
            "by a hash of each annotation file's path relative to the 300-W root); never a "
            "test set"),
    SetInfo("300w:train", "300-W train", "300W trn", "300w68", ("landmarks",),
            lambda root: D.load_300w(root, "train"), "300-W training faces (never a test set)"),
]}


class SetError(LandmarkError, ValueError):
    """An evaluation set name that is not registered nor a usable folder."""


def set_info(name: str) -> SetInfo:
    """A registered set, or a folder: `300w:DIR` (.pts faces) / `wflw:DIR` (WFLW layout)."""
    if name in SETS:
        return SETS[name]
    ds, _, rest = name.partition(":")
    if ds in ("300w", "wflw") and rest and Path(rest).is_dir():
        folder = str(Path(rest))
        if ds == "300w":
            return SetInfo(name, f"{Path(rest).name} (.pts)", Path(rest).name[:10], "300w68",
                           ("landmarks",), lambda _root: D.load_300w(folder, folder),
                           f".pts faces under {folder}")
        return SetInfo(name, f"{Path(rest).name} (WFLW)", Path(rest).name[:10], "wflw98",
                       ("rect", "landmarks"), lambda _root: D.load_wflw(folder, "test"),
                       f"WFLW-layout test list under {folder}")
    raise SetError(f"unknown evaluation set {name!r}; known: {', '.join(SETS)}, or "
                   "300w:FOLDER (a folder of .pts faces) / wflw:FOLDER (official WFLW layout)")


def load_set(name: str, root: str | None = None) -> list[D.Face]:
    """The faces of a set; `root` overrides the dataset folder of a registered set."""
    return set_info(name).load(root)


@dataclass
class ScoredSet:
    """A set with one crop protocol: what an NME is reported for."""
    info: SetInfo
    protocol: str
    root: str | None = None
    _faces: list[D.Face] | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return f"{self.info.key}/{self.protocol}"

    @property
    def title(self) -> str:
        return f"{self.info.title}, {'rect' if self.protocol == 'rect' else 'landmark'} crop"

    @property
    def short(self) -> str:
        return f"{self.info.short} {'rect' if self.protocol == 'rect' else 'lmk'}"

    @property
    def scheme(self) -> str:
        return self.info.scheme

    def faces(self) -> list[D.Face]:
        if self._faces is None:
            self._faces = self.info.load(self.root)
        return self._faces


def scored_set(key: str, root: str | None = None) -> ScoredSet:
    """`SET/PROTOCOL` (or `SET`: its first protocol)."""
    name, _, protocol = key.rpartition("/") if key.rsplit("/", 1)[-1] in PROTOCOLS else (key, "", "")
    info = set_info(name)
    protocol = protocol or info.protocols[0]
    if protocol not in info.protocols:
        raise SetError(f"set {name} cannot be scored with crop protocol {protocol!r} "
                       f"(it has {', '.join(info.protocols)})")
    return ScoredSet(info, protocol, root)


def scored_sets(keys, roots: dict[str, str | None] | None = None) -> list[ScoredSet]:
    """ScoredSets for keys; faces of the same set are read once. roots: dataset -> folder."""
    roots = roots or {}
    out, cache = [], {}
    for k in keys:
        s = scored_set(k, roots.get(k.split(":")[0]))
        if s.info.key in cache:
            s._faces = cache[s.info.key]
        else:
            cache[s.info.key] = s.faces()
            s._faces = cache[s.info.key]
        out.append(s)
    return out


def title(key: str) -> str:
    """Title of a scored-set key, for tables (the key itself if it is not registered)."""
    try:
        return scored_set(key).title
    except SetError:
        return key


def short_title(key: str) -> str:
    try:
        return scored_set(key).short
    except SetError:
        return key


# -- which output of a model scores which set --------------------------------------------------
@dataclass(frozen=True)
class Scoring:
    """One figure of a model on a scored set: `suffix` is appended to the set key ("" or
    "@68"), `output` indexes the model's outputs, `as68` scores through the 98 -> 68 map."""
    suffix: str
    output: int
    as68: bool = False


def scorings(output_schemes: list[str], set_scheme: str) -> list[Scoring]:
    """Every set is scored with the model's native output for it (same scheme; else the first
    output, through the 98 -> 68 map). On 98-point faces a model that also has, or can be
    mapped to, 68 points gets a second figure "@68": the 68-point layout on both sides, the
    figure a 68-point model reports, so old and new models compare."""
    native = [i for i, s in enumerate(output_schemes) if s == set_scheme]
    out = [Scoring("", native[0] if native else 0)]
    if set_scheme == "wflw98" and native:
        h68 = [i for i, s in enumerate(output_schemes) if s == "300w68"]
        out.append(Scoring("@68", h68[0]) if h68 else Scoring("@68", native[0], True))
    return out


def title_of(key: str) -> str:
    base, _, suffix = key.partition("@")
    return title(base) + (f", {suffix} points" if suffix else "")


def short_of(key: str) -> str:
    base, _, suffix = key.partition("@")
    return short_title(base) + (f" {suffix}" if suffix else "")
