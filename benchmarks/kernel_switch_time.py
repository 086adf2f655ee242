"""Seconds per generate call with a KernelConfig switch on and off, in one process (GPU):
`python3 benchmarks/kernel_switch_time.py [MODEL:PX:BATCH:POLICY:BUDGET:GRAN:PERIOD:SWITCH ...]`
(dense: MODEL:PX:BATCH:dense:SWITCH).

SWITCH is a True/False field of KernelConfig (on: True, off: False), or FIELD=VALUE for any other
field, VALUE a Python literal (on: that value, off: the default), e.g. `score_tile=(16,1)`.

A switch's effect measured against itself on the same device and day: each configuration is
compiled with the switch on and with it off (random weights, bf16, CFG 4, top-k 2000, as `adsa-jax
bench`), then the two programs are called in turns, 1 warm-up and --iters (default 5) timed calls
each, and their medians compared. Default cases: GPT-XL 384 px batch 64, budget 0.5, adsa-evict per
head and at layer granularity with `first_choice_scan`, at layer granularity with
`layer_choice_in_kernel`, and at period 8 per head with `leave_top_in_kernel` (four cases, ~9 min
on an H200; pass fewer to split them over two commands).
Writes $OUT/kernel_switch_time.json (a row per case: both medians, their ratio, both compile
times, whether the last call's tokens are equal) and prints one line per case.
"""
import argparse
import ast
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.getcwd())
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import adsa_jax  # noqa: E402
from adsa_jax.bench import compile_one  # noqa: E402
from adsa_jax.config import named_config  # noqa: E402
from adsa_jax.generate import Model  # noqa: E402
from adsa_jax.model import init_params  # noqa: E402
from adsa_jax.options import KernelConfig  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/out")
CASES = ["GPT-XL:384:64:adsa-evict:0.5:head:1:first_choice_scan",
         "GPT-XL:384:64:adsa-evict:0.5:layer:1:first_choice_scan",
         "GPT-XL:384:64:adsa-evict:0.5:layer:1:layer_choice_in_kernel",
         "GPT-XL:384:64:adsa-evict:0.5:head:8:leave_top_in_kernel"]


def parse(case: str):
    parts = case.split(":")
    if len(parts) == 5 and parts[3] == "dense":  # MODEL:PX:BATCH:dense:SWITCH
        model, px, batch, policy, switch = parts
        return model, int(px), int(batch), policy, None, None, None, switch
    if len(parts) != 8:
        raise SystemExit(f"kernel_switch_time.py: {case!r} is not MODEL:PX:BATCH:POLICY:BUDGET:GRAN:PERIOD:SWITCH "
                         "or MODEL:PX:BATCH:dense:SWITCH")
    model, px, batch, policy, budget, gran, period, switch = parts
    return model, int(px), int(batch), policy, float(budget), gran, int(period), switch


def settings(switch: str) -> tuple[dict, dict]:
    """(KernelConfig fields on, fields off) for a SWITCH (the module docstring)."""
    fields = {f.name for f in dataclasses.fields(KernelConfig)}
    if "=" in switch:
        name, text = switch.split("=", 1)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise SystemExit(f"kernel_switch_time.py: {text!r} in {switch!r} is not a Python literal") from None
        if name not in fields:
            raise SystemExit(f"kernel_switch_time.py: {name!r} is not a KernelConfig field")
        return {name: value}, {}
    if not isinstance(getattr(KernelConfig(), switch, None), bool):
        raise SystemExit(f"kernel_switch_time.py: {switch!r} is not a KernelConfig switch (a True/False field)")
    return {switch: True}, {switch: False}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", default=CASES)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args(argv)
    cases = [parse(c) for c in args.cases]
    for c in cases:
        settings(c[-1])  # a bad switch fails before any compile
    os.makedirs(OUT, exist_ok=True)
    rows = []
    for case, (name, px, batch, pol, budget, gran, period, switch) in zip(args.cases, cases):
        cfg = named_config(name, image_size=px)
        model = Model(cfg, init_params(cfg, jax.random.key(0), jnp.bfloat16))
        policy = (adsa_jax.make_policy(cfg, pol) if budget is None
                  else adsa_jax.make_policy(cfg, pol, budget=budget, granularity=gran, period=period))
        prepared = {}
        for value, fields in zip((True, False), settings(switch)):
            print(f"{case}: compiling {'on' if value else 'off'} ({fields or 'the default'})", flush=True)
            prepared[value] = compile_one(model, batch, policy, options=dataclasses.replace(KernelConfig(), **fields))
        times, tokens = {True: [], False: []}, {}
        for i in range(1 + args.iters):  # the two programs in turns: drift hits both alike
            for value, prep in prepared.items():
                cond, mask, ids, scalars = prep["args"]
                t0 = time.perf_counter()
                tokens[value] = prep["compiled"](model.params, cond, mask, jax.random.key(i), ids, scalars)
                tokens[value].block_until_ready()
                if i:
                    times[value].append(time.perf_counter() - t0)
        # The last call's tokens (one key for both): a switch that keeps every float operation (which
        # steps score, a split of the scan) keeps them; one that changes a tile changes rounding and may not
        same = bool((jax.device_get(tokens[True]) == jax.device_get(tokens[False])).all())
        on, off = statistics.median(times[True]), statistics.median(times[False])
        row = {"case": case, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "date": time.strftime("%Y-%m-%d"), "switch": switch, "s_per_call_on": on, "s_per_call_off": off,
               "on_over_off": on / off, "tokens_equal": same, "compile_s_on": prepared[True]["row"]["compile_s"],
               "compile_s_off": prepared[False]["row"]["compile_s"], "times_on": times[True], "times_off": times[False]}
        rows.append(row)
        print(f"{case}: on {on:.3f} s, off {off:.3f} s a call ({on / off:.3f}x); tokens {'equal' if same else 'DIFFER'}; "
              f"compile {row['compile_s_on']:.1f} against {row['compile_s_off']:.1f} s", flush=True)
        with open(os.path.join(OUT, "kernel_switch_time.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
