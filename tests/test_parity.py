"""Dense mode against the original PyTorch LlamaGen outputs (fp32, CPU)."""
import jax
import numpy as np
import pytest

import adsa_jax
from adsa_jax.sampling import filter_logits, probs, sample


def test_c2i_teacher_forced_logits(c2i, c2i_ref):
    ref = c2i_ref["teacher_forced_logits"]
    full = np.asarray(adsa_jax.forward(c2i, c2i_ref["labels"], c2i_ref["tokens"]))
    np.testing.assert_allclose(full, ref, atol=1e-4, rtol=0)
    # The cached path (prefill + lax.scan decode) gives the same logits.
    cached = np.asarray(adsa_jax.score(c2i, c2i_ref["labels"], c2i_ref["tokens"]))
    np.testing.assert_allclose(cached, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(cached, full, atol=1e-4, rtol=0)


def test_c2i_greedy_tokens_and_step_logits(c2i, c2i_ref):
    labels = c2i_ref["labels"]
    toks = np.asarray(adsa_jax.generate(c2i, labels, jax.random.key(0),
                                        sampling=adsa_jax.SamplingConfig(cfg_scale=1.0, top_k=1)))
    np.testing.assert_array_equal(toks, c2i_ref["greedy_tokens"])
    step = np.asarray(adsa_jax.score(c2i, labels, c2i_ref["greedy_tokens"]))
    np.testing.assert_allclose(step, c2i_ref["greedy_step_logits"], atol=1e-4, rtol=0)


def test_c2i_greedy_cfg(c2i, c2i_ref):
    labels, scale = c2i_ref["labels"], float(c2i_ref["cfg_scale"])
    assert scale > 1 and int(c2i_ref["cfg_interval"]) == -1
    toks = np.asarray(adsa_jax.generate(c2i, labels, jax.random.key(1),
                                        sampling=adsa_jax.SamplingConfig(cfg_scale=scale, top_k=1)))
    np.testing.assert_array_equal(toks, c2i_ref["greedy_cfg_tokens"])
    rows = np.asarray(adsa_jax.score(c2i, labels, c2i_ref["greedy_cfg_tokens"],
                                     sampling=adsa_jax.SamplingConfig(cfg_scale=scale), raw_rows=True))
    # Ours interleaves [cond_0, uncond_0, ...]; the reference stacks the conditional half first.
    b = len(labels)
    ref = c2i_ref["greedy_cfg_step_logits"]
    np.testing.assert_allclose(rows[0::2], ref[:b], atol=1e-4, rtol=0)
    np.testing.assert_allclose(rows[1::2], ref[b:], atol=1e-4, rtol=0)
    guided = np.asarray(adsa_jax.score(c2i, labels, c2i_ref["greedy_cfg_tokens"],
                                       sampling=adsa_jax.SamplingConfig(cfg_scale=scale)))
    np.testing.assert_allclose(guided, ref[b:] + (ref[:b] - ref[b:]) * scale, atol=5e-4, rtol=0)


def test_cfg_interval_switches_guidance_off_for_good(c2i, c2i_ref):
    labels, toks = c2i_ref["labels"], c2i_ref["greedy_cfg_tokens"]
    rows = np.asarray(adsa_jax.score(c2i, labels, toks, sampling=adsa_jax.SamplingConfig(cfg_scale=4.0),
                                     raw_rows=True))
    got = np.asarray(adsa_jax.score(c2i, labels, toks,
                                    sampling=adsa_jax.SamplingConfig(cfg_scale=4.0, cfg_interval=3)))
    cond, unc = rows[0::2], rows[1::2]
    guided = unc + (cond - unc) * 4.0
    # Tokens 0 .. cfg_interval+1 are guided (prefill + decode steps i <= 3), the rest are not.
    np.testing.assert_allclose(got[:, :5], guided[:, :5], atol=1e-4)
    np.testing.assert_allclose(got[:, 5:], cond[:, 5:], atol=1e-5)


def test_t2i_greedy_cfg_with_caption_masks(t2i, t2i_ref):
    emb, masks = t2i_ref["caption_embs"], t2i_ref["emb_masks"]
    assert masks.sum(1).tolist() == [7, 30]
    toks = np.asarray(adsa_jax.generate(t2i, emb, jax.random.key(0),
                                        sampling=adsa_jax.SamplingConfig(cfg_scale=7.5, top_k=1), cond_mask=masks))
    np.testing.assert_array_equal(toks, t2i_ref["greedy_cfg_tokens"])
    rows = np.asarray(adsa_jax.score(t2i, emb, toks, sampling=adsa_jax.SamplingConfig(cfg_scale=7.5), cond_mask=masks,
                                     raw_rows=True))
    ref = t2i_ref["greedy_cfg_step_logits"]
    np.testing.assert_allclose(rows[0::2], ref[:2], atol=1e-4, rtol=0)
    np.testing.assert_allclose(rows[1::2], ref[2:], atol=1e-4, rtol=0)
    # Full forward agrees with the cached path on the conditional rows, masks included.
    full = np.asarray(adsa_jax.forward(t2i, emb, toks, cond_mask=masks))
    np.testing.assert_allclose(full, ref[:2], atol=1e-4, rtol=0)


def test_sampling_filters(fixtures_dir):
    z = np.load(fixtures_dir / "sampling_filters.npz")
    logits, cases = z["logits"], z["cases"]
    for i, (temp, top_k, top_p) in enumerate(cases):
        got = np.asarray(probs(logits, float(temp), int(top_k), float(top_p)))
        np.testing.assert_allclose(got, z[f"probs_{i}"], atol=1e-6, rtol=0, err_msg=f"case {i}: {cases[i]}")


def test_sampling_keeps_top_k_ties():
    logits = np.array([[5.0, 5.0, 5.0, 1.0, 0.0]], np.float32)
    p = np.asarray(probs(logits, 1.0, 2, 1.0))
    assert (p[0, :3] > 0).all() and p[0, 3:].sum() == 0  # three tied survivors of top-2
    f = np.asarray(filter_logits(logits, 1.0, 2, 1.0, kth="pallas-interpret", top_p_on=False))
    np.testing.assert_array_equal(f > -1e29, [[True, True, True, False, False]])


@pytest.mark.parametrize("kth", ["sort", "pallas-interpret"])
def test_sampling_filters_without_sort(fixtures_dir, kth):
    """top_p_on=False with the k-th largest from a sort or from the bitwise-search kernel: the
    fixture's filtered logits exactly where top_p = 1, and the same draws."""
    z = np.load(fixtures_dir / "sampling_filters.npz")
    logits, cases = z["logits"], z["cases"]
    tested = 0
    for i, (temp, top_k, top_p) in enumerate(cases):
        if top_p < 1.0:
            continue
        want = np.asarray(filter_logits(logits, float(temp), int(top_k), 1.0))
        got = np.asarray(filter_logits(logits, float(temp), int(top_k), 1.0, kth=kth, top_p_on=False))
        np.testing.assert_array_equal(got, want, err_msg=f"case {i}: {cases[i]}")
        np.testing.assert_allclose(np.asarray(jax.nn.softmax(got, axis=-1)), z[f"probs_{i}"], atol=1e-6, rtol=0)
        tested += 1
    assert tested >= 2
    keys = jax.random.split(jax.random.key(3), logits.shape[0])
    np.testing.assert_array_equal(np.asarray(sample(keys, logits, 1.0, 5, 1.0, kth=kth, top_p_on=False)),
                                  np.asarray(sample(keys, logits, 1.0, 5, 1.0)))
