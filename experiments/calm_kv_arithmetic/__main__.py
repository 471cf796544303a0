"""``python -m experiments.calm_kv_arithmetic [--out DIR] [--quick]`` (``make demo``)."""

from experiments.calm_kv_arithmetic.repro import main

if __name__ == "__main__":
  main()
