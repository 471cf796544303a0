"""Shared helpers of the Hugging Face parity tests (``import hf_util``): tiny random
``transformers`` checkpoints, their logits and ours on one left-padded batch.

tests/checkpoints is on ``sys.path`` for its own tests (pytest's rootdir-relative
imports); tests elsewhere put it there in their conftest.
"""

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from moe_jax import decoding
from moe_jax.checkpoints import export_hf, load_hf

# Routers drawn N(0, 1): confident, no near-ties in top-k that float rounding could flip.
ROUTER = r"mlp\.gate\.weight$"
# The MoE families' redraws: confident routers, norm scales and biases (and Qwen2-MoE's
# shared-expert gate) that exercise their mappings.
MOE_REDRAW = ((ROUTER, 0, 1.0), ("norm", 1.0, 0.2), ("bias$|shared_expert_gate", 0, 0.5))


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


def checkpoint_fixture(make, variants):
  """A module-scoped fixture ``(variant, path, model)`` over ``variants``, each made once by
  ``make(path, variant)``; assign it to a test module's ``checkpoint``."""

  @pytest.fixture(scope="module", params=sorted(variants))
  def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, make(path, request.param)

  return checkpoint


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


def assert_import_matches_and_export_reloads(model, loaded, ids, mask, out_dir, *,
                                             architecture, label, atol=1e-4):
  """Our logits of ``loaded`` match ``model``'s; ``export_hf`` to ``out_dir`` reloads in
  transformers as ``architecture`` with the same logits, and in ``load_hf`` as the same config.

  Returns:
    our logits ``[B, L, V]``.
  """
  valid = np.asarray(mask, bool)
  ours = our_logits(loaded, ids, mask)
  diff = np.abs(ours[valid] - hf_logits(model, ids, mask)[valid]).max()
  print(f"{label}: import max |logit diff| {diff:.2e}")
  assert diff <= atol, f"{label}: max |logit diff| {diff}"

  export_hf(out_dir, loaded.config, loaded.params)
  written = json.loads((out_dir / "config.json").read_text())
  assert written["architectures"] == [architecture]
  again = transformers.AutoModelForCausalLM.from_pretrained(
      out_dir, attn_implementation="eager").eval()
  assert type(again).__name__ == architecture
  diff = np.abs(hf_logits(again, ids, mask)[valid] - ours[valid]).max()
  print(f"{label}: export max |logit diff| {diff:.2e}")
  assert diff <= atol, f"{label}: exported, max |logit diff| {diff}"
  assert load_hf(out_dir).config == loaded.config
  return ours


def assert_greedy_matches(model, loaded, ids, mask, *, max_new_tokens, label):
  """Our KV-cached greedy tokens equal ``model.generate``'s (eos 2, pad 0; padded past eos)."""
  with torch.no_grad():
    ref = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2,
                         pad_token_id=0, min_new_tokens=0)
  ref = ref[:, ids.shape[1]:].numpy()
  out = decoding.generate(loaded.module, loaded.params, ids, prompt_valid_BP=mask,
                          max_new_tokens=max_new_tokens, eos_id=2, pad_id=0)
  ref = np.pad(ref, ((0, 0), (0, max_new_tokens - ref.shape[1])), constant_values=0)
  np.testing.assert_array_equal(out.tokens_BN, ref, err_msg=label)
