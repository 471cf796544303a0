"""``python -m moe_jax.plan --gin_file=... --mesh=...``: see :mod:`moe_jax.cli.plan`."""

import sys

from moe_jax.cli.plan import main

if __name__ == "__main__":
  sys.exit(main())
