"""``python -m moe_jax.train --gin_file=... --model_dir=...``: see :mod:`moe_jax.cli.train`."""

import sys

from moe_jax.cli.train import main

if __name__ == "__main__":
  sys.exit(main())
