"""`python -m adsa_jax.cli`: the same as the `adsa-jax` command."""
import sys

from . import main

sys.exit(main())
