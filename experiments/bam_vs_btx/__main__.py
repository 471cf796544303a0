"""``python -m experiments.bam_vs_btx [--quick] [--seeds N] [--ablations]``: see
:mod:`experiments.bam_vs_btx.run`."""

import sys

from experiments.bam_vs_btx.run import main

if __name__ == "__main__":
  sys.exit(main())
