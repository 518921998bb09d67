"""`python -m lohan_jax` is the `lohan-jax` command."""
import sys

from lohan_jax.cli import main

sys.exit(main())
