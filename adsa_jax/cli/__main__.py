"""`python -m adsa_jax.cli`: the same as the `adsa-jax` command."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
