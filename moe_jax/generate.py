"""``python -m moe_jax.generate --checkpoint DIR ...``: see :mod:`moe_jax.cli.generate`."""

import sys

from moe_jax.cli.generate import main, parse_args  # noqa: F401  (the CLI's API)
from moe_jax.runtime import tune_cpu_allocator

if __name__ == "__main__":
  tune_cpu_allocator()  # before jax starts its threads
  sys.exit(main())
