"""``python -m moe_jax.plan --gin_file=... --mesh=...``: see :mod:`moe_jax.cli.plan`."""

import sys

from moe_jax.cli.plan import main
from moe_jax.runtime import tune_cpu_allocator

if __name__ == "__main__":
  tune_cpu_allocator()  # before jax starts its threads
  sys.exit(main())
