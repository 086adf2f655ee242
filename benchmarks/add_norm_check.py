"""On a GPU: generation with kernels.GEMV_ADD_NORM on against off (and against gemm='xla'), random-weight
GPT-B 256 px (MODEL=...), greedy with CFG 4.0: the fraction of equal tokens and, per row, the first
step where they differ (bf16 sums in another order can flip a near-tie, then the row runs apart).
DTYPE=float32 compares at float32 with jax_default_matmul_precision=highest (XLA's float32 dots
would use TF32), where the tokens should agree. Prints one JSON line; writes $OUT/add_norm_check_$DTYPE.json."""
import json
import os
import sys

sys.path.insert(0, os.getcwd())
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from adsa_jax import kernels  # noqa: E402
from adsa_jax.config import named_config  # noqa: E402
from adsa_jax.generate import Model, generate  # noqa: E402
from adsa_jax.model import init_params  # noqa: E402


def main():
    model = os.environ.get("MODEL", "GPT-B")
    cfg = named_config(model, image_size=256)
    dtype = os.environ.get("DTYPE", "bfloat16")
    if dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")
    m = Model(cfg, init_params(cfg, jax.random.key(0), jnp.dtype(dtype)))
    labels = np.arange(8, dtype=np.int32)  # 16 rows with CFG: the GEMV's most
    runs = {}
    for name, gemm, on in (("add_norm", "pallas", 1), ("gemv", "pallas", 0), ("xla", "xla", 0)):
        kernels.GEMV_ADD_NORM = on
        jax.clear_caches()  # the switch is read at trace time
        runs[name] = np.asarray(generate(m, labels, jax.random.key(1), top_k=1, cfg_scale=4.0, gemm=gemm))
    out = {"model": model, "dtype": dtype, "jax": jax.__version__, "device": jax.devices()[0].device_kind}
    for a, b in (("add_norm", "gemv"), ("add_norm", "xla"), ("gemv", "xla")):
        eq = runs[a] == runs[b]
        first = [int(np.argmin(r)) if not r.all() else -1 for r in eq]
        out[f"{a} vs {b}"] = {"tokens_equal": float(eq.mean()), "first_difference_per_row": first}
    print(json.dumps(out), flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), f"add_norm_check_{dtype}.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
