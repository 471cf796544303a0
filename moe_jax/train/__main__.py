"""``python -m moe_jax.train --gin_file=... --model_dir=...``: see :mod:`moe_jax.cli.train`."""

import sys

from moe_jax.cli.train import main
from moe_jax.runtime import tune_cpu_allocator

if __name__ == "__main__":
  tune_cpu_allocator()  # before jax starts its threads
  sys.exit(main())
