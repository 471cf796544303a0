"""Train from gin configs: ``python -m moe_jax.train --gin_file=... --model_dir=...``.

Example (a tiny decoder LM on the shipped corpus, a few minutes on CPU)::

    python -m moe_jax.train --gin_file=experiments/decoder_tiny_lm.gin \\
        --model_dir=/tmp/tiny_lm --gin.TRAIN_STEPS=500

Flags (see :mod:`moe_jax.cli.configurables`): ``--gin_file`` (repeatable),
``--gin.NAME=VALUE``, ``--gin_bindings``, ``--gin_search_paths``,
``--model_dir`` (binds ``MODEL_DIR``), and the multi-host flags
``--coordinator_address``, ``--process_count``, ``--process_id``. Re-running
the same command resumes from the newest checkpoint in ``model_dir``.

The gin files bind the arguments of :func:`moe_jax.train.run.train`
(``train.model = ...`` etc. in ``gin_configs/runs/pretrain.gin``); the
operative config is written to ``model_dir/config.gin``.
"""

from __future__ import annotations

import logging
import sys


def main(argv=None) -> int:
  from moe_jax.cli import configurables, errors
  from moe_jax.train import run

  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  try:
    args = configurables.parse_flags(argv, prog="python -m moe_jax.train", description=__doc__)
    configurables.setup(args)
  except configurables.GinConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return errors.guarded(lambda: configurables.run(run.train) and None, argv)
