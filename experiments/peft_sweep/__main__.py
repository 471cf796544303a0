"""``python -m experiments.peft_sweep --out DIR [--quick]``: see :mod:`experiments.peft_sweep.sweep`."""

import sys

from moe_jax.runtime import tune_cpu_allocator
from experiments.peft_sweep.sweep import main

if __name__ == "__main__":
  tune_cpu_allocator()  # before jax starts its threads
  sys.exit(main())
