"""Batched autoregressive decoding with a KV cache: greedy and sampling.

Works for every registered model kind (:mod:`moe_jax.models.registry`), adapted
ones too, through one cache protocol: ``module.init_cache(batch, max_len)``
gives an empty cache without parameters (decoders, MoE / BAM decoders, T5,
CALM compositions). Decoder-only models then take ``(tokens, valid_BL=,
cache=)`` and return ``(logits, cache)``; encoder-decoders (the registry's
two-input kinds, :class:`moe_jax.models.t5.T5`) ``encode`` the prompt and
``decode`` with the cache, the first call storing the encoder output in it.

Legend: B batch, P prompt length, N new tokens, V vocab.

Design notes:

* The whole generation (prefill and the token loop) is one jitted function; the
  loop is a ``lax.while_loop`` that exits as soon as every sequence has emitted
  EOS, so a batch that finishes early does not pay for ``max_new_tokens``.
* Prompts may be left- or right-padded (``prompt_valid_BP``). The cache marks
  padded slots invalid and positions count only real tokens, so both paddings
  give the same continuation as the unpadded prompt.
* Sampling math (temperature, top-k, top-p) runs in float32 on the last
  position's logits only. ``temperature == 0`` is greedy.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.models import registry

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
  """How to pick tokens.

  Attributes:
    max_new_tokens: tokens generated per sequence (EOS included).
    temperature: 0 for greedy; otherwise logits are divided by it.
    top_k: keep only the k most likely tokens (``None``/0: all).
    top_p: nucleus sampling: keep the smallest set whose mass reaches ``top_p``.
    eos_id: stop a sequence after it emits one of these (``None``: never stop).
    pad_id: written after a sequence has stopped.
    seed: PRNG seed for sampling.
  """

  max_new_tokens: int = 32
  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None
  eos_id: int | tuple[int, ...] | None = None
  pad_id: int = 0
  seed: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k is not None and self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  @property
  def eos_ids(self) -> tuple[int, ...]:
    if self.eos_id is None:
      return ()
    return tuple(self.eos_id) if isinstance(self.eos_id, (tuple, list)) else (int(self.eos_id),)


def sample_logits(logits_BV: Array, key: Array, *, temperature: float, top_k: int | None,
                  top_p: float | None) -> Array:
  """Pure token choice from last-position logits; returns int32 ``[B]``."""
  logits = logits_BV.astype(jnp.float32)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p is not None and top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The smallest logit still inside the nucleus; the top token always stays.
    keep = mass_before < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class GenerateOutput:
  """``tokens_BN``: generated ids (``pad_id`` after a stop); ``lengths_B``: tokens
  generated per sequence including EOS; ``prefill_logits_BV``: the logits that
  chose the first token (useful for parity checks)."""

  tokens_BN: np.ndarray
  lengths_B: np.ndarray
  prefill_logits_BV: np.ndarray

  def to_lists(self) -> list[list[int]]:
    return [row[:n].tolist() for row, n in zip(self.tokens_BN, self.lengths_B)]


def _last_valid_index(valid_BP: Array) -> Array:
  p = valid_BP.shape[1]
  return jnp.max(jnp.where(valid_BP, jnp.arange(p)[None, :], -1), axis=1)


@functools.lru_cache(maxsize=64)
def _build_generate(module, sampling: SamplingConfig, prompt_shape: tuple[int, int],
                    decoder_start_id: int):
  """Builds the jitted generation function for one model, config and shape."""
  b, p = prompt_shape
  n = sampling.max_new_tokens
  eos = jnp.asarray(sampling.eos_ids or (-1,), jnp.int32)
  encdec = registry.is_encoder_decoder(module.config)
  step_method = "decode" if encdec else None  # None: __call__

  def choose(logits_BV, key):
    return sample_logits(logits_BV, key, temperature=sampling.temperature,
                         top_k=sampling.top_k, top_p=sampling.top_p)

  def prefill(params, prompt_BP, valid_BP):
    if encdec:
      enc = module.apply({"params": params}, prompt_BP, valid_BP, method="encode")
      start = jnp.full((b, 1), decoder_start_id, jnp.int32)
      logits, cache = module.apply({"params": params}, start, enc_BLD=enc, enc_valid_BL=valid_BP,
                                   cache=module.init_cache(b, n + 1), method="decode")
      return logits[:, -1], cache
    logits, cache = module.apply({"params": params}, prompt_BP, valid_BL=valid_BP,
                                 cache=module.init_cache(b, p + n))
    return logits[jnp.arange(b), _last_valid_index(valid_BP)], cache

  def step(params, tokens_B, cache):
    logits, cache = module.apply({"params": params}, tokens_B[:, None], cache=cache,
                                 method=step_method)
    return logits[:, -1], cache

  def generate(params, prompt_BP, valid_BP, key):
    logits_BV, cache = prefill(params, prompt_BP, valid_BP)
    key, sub = jax.random.split(key)
    first = choose(logits_BV, sub)
    out = jnp.full((b, n), sampling.pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos)
    lengths = jnp.ones((b,), jnp.int32)

    def cond(state):
      i, _, _, done, *_ = state
      return (i < n) & ~jnp.all(done)

    def body(state):
      i, out, cache, done, lengths, key = state
      logits, cache = step(params, out[:, i - 1], cache)
      key, sub = jax.random.split(key)
      tok = choose(logits, sub)
      tok = jnp.where(done, sampling.pad_id, tok)
      out = out.at[:, i].set(tok)
      lengths = lengths + (~done).astype(jnp.int32)
      done = done | jnp.isin(tok, eos)
      return i + 1, out, cache, done, lengths, key

    state = (jnp.ones((), jnp.int32), out, cache, done, lengths, key)
    _, out, _, _, lengths, _ = jax.lax.while_loop(cond, body, state)
    return out, lengths, logits_BV

  return jax.jit(generate)


def generate(module, params, prompt_BP: Array | np.ndarray | Sequence[Sequence[int]], *,
             prompt_valid_BP: Array | np.ndarray | None = None,
             sampling: SamplingConfig | None = None, pad_side: str = "left",
             decoder_start_id: int | None = None, **sampling_kwargs: Any) -> GenerateOutput:
  """Generates continuations for a batch of prompts.

  Args:
    module: a decoder-only or encoder-decoder model (see module docstring).
    params: its parameters (boxed or not; a ``{"params": ...}`` wrapper is fine).
    prompt_BP: int token ids ``[B, P]``, or a list of variable-length id lists
      (padded on ``pad_side`` automatically).
    prompt_valid_BP: which prompt positions are real tokens (default: all).
    sampling: a :class:`SamplingConfig`; or pass its fields as keywords.
    pad_side: where ragged prompt lists get their padding.
    decoder_start_id: encoder-decoders only; default the config's
      ``decoder_start_token_id`` (0 for T5).

  Returns:
    A :class:`GenerateOutput`.
  """
  from moe_jax.checkpoints.hf import unbox

  if sampling is None:
    sampling = SamplingConfig(**sampling_kwargs)
  elif sampling_kwargs:
    sampling = dataclasses.replace(sampling, **sampling_kwargs)
  if isinstance(prompt_BP, (list, tuple)):
    prompt_BP, prompt_valid_BP = pad_prompts(prompt_BP, pad_id=sampling.pad_id, side=pad_side)
  prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
  if prompt_BP.ndim != 2:
    raise ValueError(f"prompt_BP must be [batch, length], got shape {prompt_BP.shape}")
  valid = (jnp.ones(prompt_BP.shape, bool) if prompt_valid_BP is None
           else jnp.asarray(prompt_valid_BP, bool))
  vocab = module.config.vocab_size
  bad = np.asarray(jnp.where(valid, (prompt_BP < 0) | (prompt_BP >= vocab), False))
  if bad.any():
    b, t = map(int, np.argwhere(bad)[0])
    raise ValueError(f"prompt token {int(prompt_BP[b, t])} at [{b}, {t}] is outside the "
                     f"vocabulary [0, {vocab})")
  if not bool(np.asarray(valid).any(axis=1).all()):
    raise ValueError("every prompt needs at least one valid token")
  if decoder_start_id is None:
    decoder_start_id = int(getattr(module.config, "decoder_start_token_id", 0) or 0)
  fn = _build_generate(module, sampling, tuple(prompt_BP.shape), decoder_start_id)
  out, lengths, logits = fn(unbox(params), prompt_BP, valid, jax.random.key(sampling.seed))
  return GenerateOutput(tokens_BN=np.asarray(out), lengths_B=np.asarray(lengths),
                        prefill_logits_BV=np.asarray(logits))


def pad_prompts(prompts: Sequence[Sequence[int]], *, pad_id: int = 0, side: str = "left"
                ) -> tuple[np.ndarray, np.ndarray]:
  """Pads ragged id lists into ``(ids_BP, valid_BP)``."""
  if side not in ("left", "right"):
    raise ValueError(f"pad side must be 'left' or 'right', got {side!r}")
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  p = max(len(x) for x in prompts)
  ids = np.full((len(prompts), p), pad_id, np.int32)
  valid = np.zeros((len(prompts), p), bool)
  for i, row in enumerate(prompts):
    sl = slice(p - len(row), p) if side == "left" else slice(0, len(row))
    ids[i, sl] = row
    valid[i, sl] = True
  return ids, valid
