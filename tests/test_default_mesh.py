"""With several devices and no mesh given, generate splits the batch over all of them."""
import json
import os
import subprocess
import sys
import textwrap


def test_generate_uses_all_devices_by_default(c2i_dir):
    code = textwrap.dedent(f"""
        import json, jax, numpy as np
        import adsa_jax
        from adsa_jax.sharding import make_mesh
        m = adsa_jax.load({str(c2i_dir)!r}, dtype="float32")
        labels = np.arange(8) % 10
        sampling = adsa_jax.SamplingConfig(top_k=50)
        auto = adsa_jax.generate(m, labels, jax.random.key(3), sampling=sampling)
        explicit = adsa_jax.generate(m, labels, jax.random.key(3), sampling=sampling, mesh=make_mesh(data=4))
        try:  # a one-device kernel, asked for by name: refused before any compile, saying why
            adsa_jax.generate(m, labels, jax.random.key(3), options=adsa_jax.KernelConfig(gemm="pallas-interpret"))
            refused = ""
        except adsa_jax.config.ConfigError as e:
            refused = str(e)
        print(json.dumps({{"n": jax.device_count(), "devices": len(auto.sharding.device_set),
                           "same": bool((np.asarray(auto) == np.asarray(explicit)).all()), "refused": refused}}))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu",  # the run's XLA_FLAGS (conftest) and the device count
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    refused = out.pop("refused")
    assert out == {"n": 4, "devices": 4, "same": True}
    assert "all 4 devices" in refused and "CUDA_VISIBLE_DEVICES" in refused, refused
