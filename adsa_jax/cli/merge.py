"""``adsa-jax merge``: the part files of a (multi-host) ``sample --npz`` run into the .npz."""
from __future__ import annotations

from .common import log, parser


def add_parser(sub):
    p = parser(sub, "merge", "merge the part files of a (multi-host) --npz run into the .npz")
    p.add_argument("npz", help="the run's --npz output; parts are read from NPZ.parts/ (without .npz)")
    p.add_argument("--parts", default=None, help="parts directory (default: NPZ.parts next to the output)")
    p.set_defaults(run=run)


def run(a):
    from ..runs import merge

    return merge(a.npz, a.parts, log=log)
