"""``python -m convert gpt SRC.pt --model GPT-XL --image-size 384 --out DIR`` (same as ``adsa-jax convert``)."""
import sys

from adsa_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert"] + sys.argv[1:]))
