"""``python -m moe_jax.generate --checkpoint DIR ...``: see :mod:`moe_jax.cli.generate`."""

import sys

from moe_jax.cli.generate import main, parse_args  # noqa: F401  (the CLI's API)

if __name__ == "__main__":
  sys.exit(main())
