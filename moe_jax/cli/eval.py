"""Evaluate a checkpoint on seqio tasks: ``python -m moe_jax.eval --gin_file=runs/eval.gin ...``.

Example (a model trained with ``experiments/t5_tiny_mix.gin``)::

    python -m moe_jax.eval --gin_file=runs/eval.gin --checkpoint=/tmp/t5 \\
        --gin.MIXTURE_OR_TASK_NAME=\\"synthetic_mix\\" \\
        --gin.TASK_FEATURE_LENGTHS="{'inputs': 32, 'targets': 24}"

The gin file binds the arguments of :func:`moe_jax.train.run.evaluate`:
validation loss over a split and the tasks' seqio ``metric_fns`` (see
:mod:`moe_jax.train.evaluation`). Flags are those of ``python -m
moe_jax.train`` (``--gin_file``, ``--gin.NAME=VALUE``, ``--gin_bindings``,
``--gin_search_paths``) plus ``--checkpoint`` (binds ``CHECKPOINT_PATH``) and
``--model_dir`` (binds ``MODEL_DIR``: where results and ``eval_config.gin``
are written). The results are printed as a dict.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv=None) -> int:
  from moe_jax.cli import configurables, errors
  from moe_jax.train import run

  try:
    args = configurables.parse_flags(argv, prog="python -m moe_jax.eval", checkpoint_flag=True,
                                     description=__doc__)
    configurables.setup(args)
  except configurables.GinConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  def body():
    results = configurables.run(run.evaluate)
    if args.model_dir:
      configurables.write_operative_config(Path(args.model_dir), name="eval_config.gin")
    print(results)

  return errors.guarded(body, argv)
