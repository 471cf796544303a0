"""Adapters in a gin-configured training run: :func:`adapted_model`.

The trainer takes a model wrapper (:class:`~moe_jax.train.wrappers.BaseModel`);
:func:`adapted_model` returns the backbone's wrapper with its module adapted by
:func:`moe_jax.peft.adapt`. Everything else a PEFT run needs is already in the
run gin files::

    MODEL = @peft.adapted_model()
    adapted_model.base = @train.model_from_checkpoint()   # the backbone's architecture
    adapted_model.peft = @peft.PeftConfig()
    PeftConfig.method = 'mov'
    PeftConfig.num_experts = 10
    ASSIGNMENT_MAP = [('.*peft_.*', None)]                 # adapters start fresh
    train.trainable = @peft.trainable_mask                 # only adapters train

The backbone weights restore into the adapted model by name (the adapter
parameters are extra ``peft_*`` children, see :mod:`moe_jax.peft.layers`).
``peft=None`` returns the backbone wrapper itself (full fine-tuning), so one
gin tier serves every method of a comparison.
"""

from __future__ import annotations

import copy
from typing import Any

from moe_jax.peft.config import PeftConfig
from moe_jax.peft.layers import adapt


def adapted_model(base: Any, peft: PeftConfig | None = None, *,
                  allow_causal_prefix_lm: bool | None = None) -> Any:
  """``base`` (a model wrapper) with its module adapted per ``peft``.

  Args:
    base: a :class:`~moe_jax.train.wrappers.BaseModel` (e.g. from
      ``model_from_checkpoint``); it is not modified.
    peft: the adapters; ``None`` keeps the module as is (full fine-tuning).
    allow_causal_prefix_lm: set ``DecoderOnlyModel.allow_causal_prefix_lm``
      (train seq2seq tasks on a causal decoder through seqio's prefix-LM
      features); ``None`` leaves the wrapper's setting. Ignored by
      encoder-decoders, which have no such switch.

  Returns:
    A new wrapper of the same class sharing ``base``'s config and loss.

  Raises:
    ValueError: ``peft`` is not a :class:`PeftConfig` or ``None``.
  """
  if peft is not None and not isinstance(peft, PeftConfig):
    raise ValueError(f"adapted_model: peft must be a PeftConfig or None, got {peft!r}")
  if not hasattr(base, "module") or not hasattr(base, "loss_fn"):
    raise ValueError(f"adapted_model: base must be a model wrapper (BaseModel), got "
                     f"{type(base).__name__}")
  model = copy.copy(base)
  if peft is not None:
    model.module = adapt(base.module, peft)
  if allow_causal_prefix_lm is not None and hasattr(model, "allow_causal_prefix_lm"):
    model.allow_causal_prefix_lm = bool(allow_causal_prefix_lm)
  return model
