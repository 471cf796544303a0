"""``python -m moe_jax.upcycle --method ... --out DIR``: see :mod:`moe_jax.cli.upcycle`."""

import sys

from moe_jax.cli.upcycle import build, main, parse_args  # noqa: F401  (the CLI's API)
from moe_jax.runtime import tune_cpu_allocator

if __name__ == "__main__":
  tune_cpu_allocator()  # before jax starts its threads
  sys.exit(main())
