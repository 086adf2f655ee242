"""``adsa-jax``, the command line: one module per command, each parsing its flags into the
library's option objects (:class:`~adsa_jax.options.SamplingConfig`, a policy from
:func:`~adsa_jax.make_policy`, :class:`~adsa_jax.options.KernelConfig`) and reporting progress on
stderr. The library never imports this package.

    convert   LlamaGen .pt checkpoints -> adsa_jax directories     (cli/convert.py)
    sample    images, tokens, PNGs, resumable .npz; the demo model (cli/sample.py)
    merge     the parts of a multi-host --npz run                    (cli/merge.py)
    compare   KV memory and fidelity of each policy                  (cli/compare.py)
    bench     speed, memory and roofline                             (cli/bench.py)
    eval-demo quality of each policy on the demo model               (cli/eval_demo.py)
    plan      memory per device on a mesh, compiled ahead of time    (cli/plan.py)
"""
from __future__ import annotations

import argparse
import sys

from ..config import ConfigError
from . import bench, compare, convert, eval_demo, merge, plan, sample

COMMANDS = (convert, sample, merge, compare, bench, eval_demo, plan)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adsa-jax", description="LlamaGen image generation in JAX with ADSA sparse "
                                "KV caches. `adsa-jax COMMAND --help` documents each command's flags.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        a.run(a)
    except (ConfigError, ValueError, OSError) as e:  # OSError: a file or folder the user named (its name is in e)
        print(f"adsa-jax {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
