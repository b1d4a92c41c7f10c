"""This repository's device runtime (runtime.pipeline.Pipeline) as a benchmark/runtime_vs.py
worker: the settings are the runtime's defaults unless given.

    PEER_CORE=0 python benchmark/peers/ours_worker.py BUNDLE [--no-refine] ...
"""
from __future__ import annotations

import click
from protocol import serve

from runtime.pipeline import Pipeline


@click.command()
@click.argument("bundle")
@click.option("--refine", type=click.Choice(["auto", "on", "off"]), default=None,
              help="[default: the runtime's]")
@click.option("--level/--no-level", default=True)
@click.option("--max-faces", default=None, type=int, help="[default: the runtime's]")
def main(bundle, refine, level, max_faces):
    kw = {} if refine is None else {"refine": {"on": True, "off": False}.get(refine, refine)}
    if max_faces:
        kw["max_faces"] = max_faces
    still = Pipeline(bundle, track=False, pose=False, level=level, **kw)

    def image(bgr):
        return [f["points"] for f in still.process(bgr)]

    def video():
        pipe = Pipeline(bundle, track=True, pose=False, level=level, **kw)
        return lambda bgr: [f["points"] for f in pipe.process(bgr)]

    serve(image, video)


if __name__ == "__main__":
    main()
