"""``python -m experiments.calm_kv_arithmetic [--out DIR] [--quick]`` (``make demo``)."""

from moe_jax.runtime import tune_cpu_allocator
from experiments.calm_kv_arithmetic.repro import main

if __name__ == "__main__":
  tune_cpu_allocator()  # before jax starts its threads
  main()
