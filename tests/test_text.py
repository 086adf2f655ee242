"""Text conditioning: a tiny T5 made here (random weights, local tokenizer; no downloads) through
``adsa_jax.text.encode_prompts`` and the CLI's --prompt / --caption-embs paths on the t2i fixture."""
import numpy as np
import pytest

from adsa_jax.cli import main
from adsa_jax.text import encode_prompts, left_pad, save_caption_embs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = "a an the blue red green car dog cat house tree on in of with big small photo painting".split()
PROMPTS = ["a blue car", "a painting of a big red dog on the green tree in a small house"]


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """T5 encoder with d_model 64 (the t2i fixture's caption_dim) and a WordLevel tokenizer whose
    post-processor appends </s>, as T5's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    d = tmp_path_factory.mktemp("t5") / "tiny-t5"
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(d)
    cfg = T5Config(vocab_size=32, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=2,
                   feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    T5EncoderModel(cfg).save_pretrained(d)
    return d


def test_encode_prompts_matches_hf_encoder(tiny_t5):
    from transformers import AutoTokenizer, T5EncoderModel

    emb, masks = encode_prompts(PROMPTS, tiny_t5, dtype="float32", device="cpu")
    assert emb.shape == (2, 120, 64) and emb.dtype == np.float32
    assert masks.shape == (2, 120) and masks.dtype == np.int32
    n = [len(p.split()) + 1 for p in PROMPTS]  # words + EOS
    assert masks.sum(1).tolist() == n
    for i in range(2):  # left padding: zeros first, valid tokens last; masked rows exactly zero
        assert masks[i, : 120 - n[i]].sum() == 0 and masks[i, 120 - n[i]:].all()
        assert not emb[i, : 120 - n[i]].any()
        assert np.abs(emb[i, 120 - n[i]:]).sum(-1).min() > 0

    # the same as tokenizer + encoder called directly (LlamaGen's T5Embedder), then rotated
    tk = AutoTokenizer.from_pretrained(tiny_t5, local_files_only=True)
    enc = T5EncoderModel.from_pretrained(tiny_t5, local_files_only=True).eval()
    t = tk(PROMPTS, max_length=120, padding="max_length", truncation=True, return_attention_mask=True,
           add_special_tokens=True, return_tensors="pt")
    assert t["input_ids"][0, n[0] - 1] == 1  # EOS appended
    with torch.no_grad():
        ref = enc(input_ids=t["input_ids"], attention_mask=t["attention_mask"])["last_hidden_state"].numpy()
    m = t["attention_mask"].numpy()
    np.testing.assert_array_equal(masks, m[:, ::-1])
    for i in range(2):
        np.testing.assert_allclose(emb[i, 120 - n[i]:], ref[i, : n[i]], rtol=1e-5, atol=1e-5)

    right, rmask = encode_prompts(PROMPTS, tiny_t5, dtype="float32", device="cpu", left_padding=False)
    np.testing.assert_array_equal(rmask, m)
    np.testing.assert_allclose(right, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(left_pad(right, rmask)[0], emb, rtol=1e-6, atol=1e-6)

    bf, bmask = encode_prompts(PROMPTS, tiny_t5, device="cpu")  # default bf16, as LlamaGen's sampler
    np.testing.assert_array_equal(bmask, masks)
    assert bf.dtype == np.float32 and not bf[masks == 0].any()
    np.testing.assert_allclose(bf, emb, atol=0.15)


def test_long_prompt_truncated_with_warning(tiny_t5):
    long = " ".join(["red"] * 150)
    with pytest.warns(UserWarning, match=r"longer than 120 T5 tokens.*151 tokens.*truncated"):
        emb, masks = encode_prompts([long, "a car"], tiny_t5, dtype="float32", device="cpu")
    assert masks[0].all() and masks[1].sum() == 3
    with pytest.raises(ValueError, match="longer than 120"):
        encode_prompts([long], tiny_t5, dtype="float32", device="cpu", on_long="error")


def test_t5_path_errors(tmp_path, tiny_t5):
    with pytest.raises(ValueError, match="not found"):
        encode_prompts(["a car"], tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        encode_prompts(["a car"], tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        encode_prompts(["a car"], tiny_t5 / "config.json")


def test_cli_prompt_and_caption_embs(tmp_path, t2i_dir, t2i_ref, tiny_t5, capsys):
    # --prompt end to end with the tiny T5; the same features through --caption-embs give the same tokens
    common = ["sample", "--gpt", str(t2i_dir), "--dtype", "float32", "--cfg-scale", "7.5", "--top-k", "1"]
    out = tmp_path / "prompt_tokens.npy"
    assert main(common + ["--t5", str(tiny_t5), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                          "--tokens-out", str(out)]) == 0
    tokens = np.load(out)
    assert tokens.shape == (2, 64) and tokens.dtype == np.int32
    emb, masks = encode_prompts(PROMPTS, tiny_t5, dtype="float32", device="cpu")
    save_caption_embs(tmp_path / "mine.npz", emb, masks)
    out2 = tmp_path / "embs_tokens.npy"
    assert main(common + ["--caption-embs", str(tmp_path / "mine.npz"), "--tokens-out", str(out2)]) == 0
    np.testing.assert_array_equal(np.load(out2), tokens)

    # --prompts-file: one prompt per line, blank lines skipped
    pf = tmp_path / "prompts.txt"
    pf.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    out3 = tmp_path / "file_tokens.npy"
    assert main(common + ["--t5", str(tiny_t5), "--prompts-file", str(pf), "--tokens-out", str(out3)]) == 0
    np.testing.assert_array_equal(np.load(out3), tokens)

    # the fixture's greedy CFG tokens from its stored caption features, through --caption-embs
    ref_npz = tmp_path / "ref.npz"
    save_caption_embs(ref_npz, t2i_ref["caption_embs"], t2i_ref["emb_masks"])
    out4 = tmp_path / "ref_tokens.npy"
    assert float(t2i_ref["cfg_scale"]) == 7.5
    assert main(common + ["--caption-embs", str(ref_npz), "--tokens-out", str(out4)]) == 0
    np.testing.assert_array_equal(np.load(out4), t2i_ref["greedy_cfg_tokens"])


def test_cli_errors(tmp_path, t2i_dir, c2i_dir, t2i_ref, tiny_t5, capsys):
    def err(args):
        assert main(["sample", "--dtype", "float32"] + args) == 2
        return capsys.readouterr().err

    assert "caption source" in err(["--gpt", str(t2i_dir)])
    assert "--t5 PATH" in err(["--gpt", str(t2i_dir), "--prompt", "a car"])
    assert "not found" in err(["--gpt", str(t2i_dir), "--prompt", "a car", "--t5", str(tmp_path / "missing")])
    msg = err(["--gpt", str(t2i_dir), "--prompt", "a car", "--caption-embs", "x.npz", "--t5", str(tiny_t5)])
    assert "not both" in msg
    assert "class-conditional" in err(["--gpt", str(c2i_dir), "--prompt", "a car", "--t5", str(tiny_t5)])
    assert "not --classes" in err(["--gpt", str(t2i_dir), "--classes", "1,2"])
    wide = tmp_path / "wide.npz"
    save_caption_embs(wide, np.zeros((2, 120, 32), np.float32), t2i_ref["emb_masks"])
    msg = err(["--gpt", str(t2i_dir), "--caption-embs", str(wide)])
    assert "width 32" in msg and "caption_dim 64" in msg
    # a T5 whose width is not the model's caption_dim: both numbers, before loading anything
    import json
    other = tmp_path / "t5-other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**json.loads((tiny_t5 / "config.json").read_text()),
                                                   "d_model": 2048}))
    msg = err(["--gpt", str(t2i_dir), "--prompt", "a car", "--t5", str(other)])
    assert "2048" in msg and "64" in msg


# Run in a fresh interpreter where the t5 extra (transformers, torch) fails to import as if it were
# not installed (None in sys.modules blocks an import); this process and its imports are left as
# they are.
NO_T5_EXTRA = """
import sys
sys.modules["transformers"] = sys.modules["torch"] = None
from adsa_jax.cli import main
from adsa_jax.text import T5NotInstalledError, encode_prompts
try:
    encode_prompts(["a car"], sys.argv[2])
except T5NotInstalledError as e:
    print(e)
else:
    sys.exit("encode_prompts ran without transformers and torch")
sys.exit(main(["sample", "--gpt", sys.argv[1], "--dtype", "float32", "--prompt", "a car", "--t5", sys.argv[2]]))
"""


def test_missing_t5_extra_message(t2i_dir, tiny_t5):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", NO_T5_EXTRA, str(t2i_dir), str(tiny_t5)], capture_output=True,
                       text=True, timeout=300)
    # the API raises the install hint; the command exits 2 with it as its last line, no traceback
    assert 'pip install "adsa-jax[t5]"' in r.stdout and "import failed" in r.stdout, r.stdout + r.stderr
    assert r.returncode == 2, r.stderr
    assert 'pip install "adsa-jax[t5]"' in r.stderr.strip().splitlines()[-1] and "Traceback" not in r.stderr
