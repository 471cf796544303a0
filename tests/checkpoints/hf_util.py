"""Shared helpers of the Hugging Face parity tests (``import hf_util``): tiny random
``transformers`` checkpoints, their logits and ours on one left-padded batch.

tests/checkpoints is on ``sys.path`` for its own tests (pytest's rootdir-relative
imports); tests elsewhere put it there in their conftest.
"""

import re

import jax.numpy as jnp
import numpy as np
import torch
import transformers

# Routers drawn N(0, 1): confident, no near-ties in top-k that float rounding could flip.
ROUTER = r"mlp\.gate\.weight$"


def redraw_(model, rules):
  """Draws each parameter the first matching rule names from a normal, in place.

  Args:
    model: a torch module.
    rules: ``(pattern, mean, std)`` triples; ``pattern`` is searched in the
      parameter's name (``re.search``). Parameters no rule matches keep their init.
  """
  with torch.no_grad():
    for name, p in model.named_parameters():
      for pattern, mean, std in rules:
        if re.search(pattern, name):
          p.normal_(mean, std)
          break


def make_hf(path, config_cls, model_cls, config, *, redraw=(), seed=0, dtype=None,
            adjust=None, **save_kw):
  """A tiny random ``transformers`` causal LM (eager attention), saved as safetensors.

  Args:
    path: where ``save_pretrained`` writes.
    config_cls, model_cls: names in ``transformers`` (``"LlamaConfig"``,
      ``"LlamaForCausalLM"``).
    config: the config's keyword arguments.
    redraw: :func:`redraw_` rules, so zero biases or unit norm scales cannot hide
      a mistaken mapping.
    seed: torch's seed for the init and the redraws.
    dtype: a torch dtype to cast to before saving (``None``: float32).
    adjust: ``fn(model)`` run under ``torch.no_grad()`` after the redraws
      (buffers, say).
    **save_kw: more ``save_pretrained`` arguments (``max_shard_size``).

  Returns:
    the model, in eval mode.
  """
  torch.manual_seed(seed)
  cfg = getattr(transformers, config_cls)(**config)
  cfg._attn_implementation = "eager"
  model = getattr(transformers, model_cls)(cfg).eval()
  redraw_(model, redraw)
  if adjust is not None:
    with torch.no_grad():
      adjust(model)
  if dtype is not None:
    model = model.to(dtype)
  model.save_pretrained(path, safe_serialization=True, **save_kw)
  return model


def hf_logits(model, ids, mask):
  """``transformers`` logits ``[B, L, V]`` (float32 NumPy) of left- or right-padded rows.

  ``mask`` is 1 / ``True`` on real tokens; positions count real tokens only.
  """
  mask = np.asarray(mask, np.int64)
  pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(pos, dtype=torch.long))
  return out.logits.float().numpy()


def hf_valid_logits(model, ids, valid):
  """:func:`hf_logits` at the real tokens only: ``[N, V]``."""
  return hf_logits(model, ids, valid)[np.asarray(valid, bool)]


def our_logits(loaded, ids, mask):
  """Our logits ``[B, L, V]`` of a loaded model (``load_hf`` / ``load_checkpoint``)."""
  out, _ = loaded.module.apply({"params": loaded.params}, jnp.asarray(ids),
                               valid_BL=jnp.asarray(mask, bool))
  return np.asarray(out)


def batch(rng, vocab, *, b=3, length=10, left_pad=(0, 3)):
  """Random ids in ``[3, vocab)`` (0-2: pad / bos / eos) and their 0/1 mask.

  ``left_pad[i]`` padding tokens (id 0) open row ``i``; rows past it have none.
  """
  ids = rng.integers(3, vocab, size=(b, length))
  mask = np.ones((b, length), np.int64)
  for row, n in enumerate(left_pad):
    mask[row, :n] = 0
  return np.where(mask == 1, ids, 0), mask
