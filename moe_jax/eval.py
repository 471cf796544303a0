"""``python -m moe_jax.eval --gin_file=runs/eval.gin --checkpoint=DIR ...``: see :mod:`moe_jax.cli.eval`.

The evaluation itself is :func:`moe_jax.train.run.evaluate` (and
:mod:`moe_jax.train.evaluation`).
"""

import sys

from moe_jax.cli.eval import main
from moe_jax.runtime import tune_cpu_allocator

if __name__ == "__main__":
  tune_cpu_allocator()  # before jax starts its threads
  sys.exit(main())
