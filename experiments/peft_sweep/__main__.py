"""``python -m experiments.peft_sweep --out DIR [--quick]``: see :mod:`experiments.peft_sweep.sweep`."""

import sys

from experiments.peft_sweep.sweep import main

if __name__ == "__main__":
  sys.exit(main())
