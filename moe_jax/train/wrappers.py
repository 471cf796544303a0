"""Model wrappers (t5x's ``BaseModel`` contract): seqio batch features -> module calls.

Legend: B batch, L length, V vocab, N new tokens.

A wrapper owns a flax module (built from a registered config, see
:mod:`moe_jax.models.registry`) and the loss settings, and knows how seqio's
feature names map onto the module's call:

==========================  ==============================================
wrapper                     features read
==========================  ==============================================
:class:`DecoderOnlyModel`   decoder_input_tokens, decoder_target_tokens,
                            decoder_loss_weights, (packed) decoder_segment_ids,
                            decoder_positions; prefix-LM eval also reads
                            decoder_causal_attention (to find the prompt)
:class:`EncoderDecoderModel` encoder_input_tokens, (packed) encoder_segment_ids
                            plus the decoder features above
==========================  ==============================================

Methods (pure in ``params``; the trainer jits them):

* ``loss_fn(params, batch, rng) -> (loss, metrics)``: token cross-entropy with
  z-loss plus the model's sown auxiliary losses (see :mod:`losses`).
* ``score_batch(params, batch) -> [B]``: per-example log-likelihood of the
  targets (weights 0 are skipped), for rank classification and score metrics.
* ``predict_batch(params, batch, ...) -> [B, N]``: generated ids, through
  :func:`moe_jax.decoding.generate` (host-side, jits itself).

**Prefix LM.** Our ``Decoder`` is causal everywhere; it has no bidirectional
prefix. A batch with ``decoder_causal_attention`` (seqio's prefix-LM
converter) is therefore refused for training with ``NotImplementedError``
unless ``DecoderOnlyModel(allow_causal_prefix_lm=True)``, which trains such
tasks with causal attention (loss on the targets only, as the converter's
weights say). Prediction and scoring use the feature only to find the prompt.
"""

from __future__ import annotations

import abc
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.models import registry
from moe_jax.train import losses as losses_lib

Array = jax.Array
Batch = Mapping[str, Any]


class BaseModel(abc.ABC):
  """A flax module plus the mapping from seqio features to its call."""

  #: Name of the seqio feature converter this model trains with.
  FEATURE_CONVERTER: str = ""
  #: Number of ``[B, L]`` token arrays the module takes positionally.
  NUM_TOKEN_INPUTS: int = 1

  def __init__(self, config: Any, *, loss: losses_lib.LossConfig | None = None,
               module: Any = None,
               mutable: tuple[str, ...] = losses_lib.MUTABLE_COLLECTIONS):
    """Args:
      config: a registered model config (``DecoderConfig``, ``T5Config``, ...).
      loss: token-loss settings; default :class:`losses.LossConfig`.
      module: the flax module; default ``registry.build_module(config)``.
      mutable: collections asked for when computing the loss (see
        :mod:`losses` for the aux-loss / metrics convention).
    """
    self.config = config
    self.module = module if module is not None else registry.build_module(config)
    self.loss_config = loss or losses_lib.LossConfig()
    self.mutable = tuple(mutable)

  def __repr__(self) -> str:
    return f"{type(self).__name__}({type(self.config).__name__}, loss={self.loss_config})"

  @property
  def kind(self) -> str:
    return registry.kind_of(self.config)

  @property
  def vocab_size(self) -> int:
    return int(self.config.vocab_size)

  # -- parameters --------------------------------------------------------------

  def _dummy_tokens(self) -> list[Array]:
    return [jnp.zeros((1, 1), jnp.int32)] * self.NUM_TOKEN_INPUTS

  def init_variables(self, rng: Array) -> dict:
    """Boxed variables (``LogicallyPartitioned`` leaves keep their logical axes)."""
    return self.module.init({"params": rng}, *self._dummy_tokens())

  def abstract_boxed_params(self) -> Any:
    """Shape tree of the boxed parameters (no allocation), for sharding specs."""
    return jax.eval_shape(self.init_variables, jax.random.key(0))["params"]

  def init_params(self, rng: Array) -> dict:
    """Fresh unboxed parameters (call under jit with out_shardings to shard)."""
    import flax.linen as nn

    return nn.meta.unbox(self.init_variables(rng)["params"])

  # -- forward -----------------------------------------------------------------

  @abc.abstractmethod
  def apply(self, params: Any, batch: Batch, *, rngs: Mapping[str, Array] | None = None,
            mutable: tuple[str, ...] | bool = ()) -> tuple[Array, Mapping[str, Any]]:
    """``(logits_BLV, sown_collections)`` for a batch of seqio features."""

  def loss_fn(self, params: Any, batch: Batch, rng: Array | None = None
              ) -> tuple[Array, dict[str, Array]]:
    """``(loss, metrics)``: token loss (+ z-loss) plus the sown auxiliary losses.

    ``rng`` (training) is split into the ``dropout`` and ``jitter`` streams;
    without it the model runs deterministically.
    """
    rngs = None
    if rng is not None:
      dropout, jitter = jax.random.split(rng)
      rngs = {"dropout": dropout, "jitter": jitter}
    logits, state = self.apply(params, batch, rngs=rngs, mutable=self.mutable)
    tl = losses_lib.token_loss(logits, batch["decoder_target_tokens"],
                               batch.get("decoder_loss_weights"), self.loss_config)
    aux_total, aux_by_name = losses_lib.collect_aux_losses(state)
    loss = tl.loss + aux_total
    metrics = {
        "loss": loss,
        "cross_entropy": tl.cross_entropy,
        "z_loss": tl.z_loss,
        "accuracy": tl.num_correct / jnp.maximum(tl.num_tokens, 1.0),
        "num_tokens": tl.num_tokens,
    }
    if aux_by_name:
      metrics["aux_loss"] = aux_total
      metrics.update({f"aux_loss/{k}": v for k, v in aux_by_name.items()})
    metrics.update({f"model/{k}": v for k, v in losses_lib.collect_metrics(state).items()})
    metrics.update(losses_lib.collect_layer_metrics(state, params))
    return loss, metrics

  def score_batch(self, params: Any, batch: Batch) -> Array:
    """``[B]`` log-likelihood of each row's weighted target tokens (unpacked batches)."""
    batch = {k: v for k, v in batch.items() if k != "decoder_causal_attention"}
    logits, _ = self.apply(params, batch, mutable=False)
    return losses_lib.sequence_log_likelihood(logits, batch["decoder_target_tokens"],
                                              batch.get("decoder_loss_weights"))

  # -- prediction --------------------------------------------------------------

  @abc.abstractmethod
  def prompts(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """``(prompt_BP, valid_BP)`` numpy arrays the generation starts from."""

  def predict_batch(self, params: Any, batch: Batch, *, max_new_tokens: int,
                    eos_id: int | None = None, pad_id: int = 0, temperature: float = 0.0,
                    seed: int = 0) -> np.ndarray:
    """``[B, N]`` generated ids (``pad_id`` after EOS), greedy by default."""
    from moe_jax import decoding

    prompt_BP, valid_BP = self.prompts(batch)
    out = decoding.generate(self.module, params, prompt_BP, prompt_valid_BP=valid_BP,
                            max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                            temperature=temperature, seed=seed)
    return out.tokens_BN


def _apply(module, params, args, kwargs, rngs, mutable) -> tuple[Array, Mapping[str, Any]]:
  """``module.apply`` returning ``(logits, sown collections)`` with or without ``mutable``."""
  if mutable:
    (logits, _), state = module.apply({"params": params}, *args, rngs=rngs,
                                      mutable=list(mutable), **kwargs)
    return logits, state
  logits, _ = module.apply({"params": params}, *args, rngs=rngs, **kwargs)
  return logits, {}


class DecoderOnlyModel(BaseModel):
  """Decoder-only LM (``Decoder``, ``MoeDecoder``, ...) on seqio decoder features."""

  FEATURE_CONVERTER = "decoder"
  NUM_TOKEN_INPUTS = 1

  def __init__(self, config: Any, *, loss: losses_lib.LossConfig | None = None,
               module: Any = None, allow_causal_prefix_lm: bool = False,
               mutable: tuple[str, ...] = losses_lib.MUTABLE_COLLECTIONS):
    super().__init__(config, loss=loss, module=module, mutable=mutable)
    if hasattr(self.module, "encode"):
      raise ValueError(f"DecoderOnlyModel got an encoder-decoder module "
                       f"({type(self.module).__name__}); use EncoderDecoderModel")
    self.allow_causal_prefix_lm = allow_causal_prefix_lm

  def apply(self, params, batch, *, rngs=None, mutable=()):
    if "decoder_causal_attention" in batch and not self.allow_causal_prefix_lm:
      raise NotImplementedError(
          "the batch has decoder_causal_attention (seqio prefix-LM features), but "
          f"{type(self.module).__name__} has no bidirectional prefix attention. Use the "
          "'decoder' feature converter, an encoder-decoder model, or set "
          "DecoderOnlyModel.allow_causal_prefix_lm = True to train the prefix causally.")
    return _apply(self.module, params, (jnp.asarray(batch["decoder_input_tokens"]),),
                  dict(segment_ids_BL=batch.get("decoder_segment_ids"),
                       positions_BL=batch.get("decoder_positions")), rngs, mutable)

  def prompts(self, batch):
    tokens_BL = np.asarray(batch["decoder_input_tokens"])
    if "decoder_causal_attention" not in batch:
      raise ValueError(
          "DecoderOnlyModel.predict_batch needs decoder_causal_attention to find the prompt "
          "(tasks with 'inputs' through the prefix_lm feature converter); a targets-only "
          "task has nothing to condition on")
    causal_BL = np.asarray(batch["decoder_causal_attention"]).astype(bool)
    b, l = tokens_BL.shape
    # The prefix is [0 (BOS), inputs...]; left-align nothing: left-pad to a fixed width
    # so every batch has one shape (one compilation).
    n_B = np.maximum(causal_BL.sum(axis=1), 1)
    prompt_BP = np.zeros((b, l), np.int32)
    valid_BP = np.zeros((b, l), bool)
    for i, n in enumerate(n_B):
      prompt_BP[i, l - n:] = tokens_BL[i, :n]
      valid_BP[i, l - n:] = True
    return prompt_BP, valid_BP


class EncoderDecoderModel(BaseModel):
  """Encoder-decoder LM (``T5``) on seqio enc-dec features."""

  FEATURE_CONVERTER = "enc_dec"
  NUM_TOKEN_INPUTS = 2

  def __init__(self, config: Any, *, loss: losses_lib.LossConfig | None = None,
               module: Any = None,
               mutable: tuple[str, ...] = losses_lib.MUTABLE_COLLECTIONS):
    super().__init__(config, loss=loss, module=module, mutable=mutable)
    if not hasattr(self.module, "encode"):
      raise ValueError(f"EncoderDecoderModel got a decoder-only module "
                       f"({type(self.module).__name__}); use DecoderOnlyModel")

  def apply(self, params, batch, *, rngs=None, mutable=()):
    enc_tokens = jnp.asarray(batch["encoder_input_tokens"])
    enc_seg = batch.get("encoder_segment_ids")
    dec_seg = batch.get("decoder_segment_ids")
    if (enc_seg is None) != (dec_seg is None):
      raise ValueError("packed enc-dec batches need both encoder_segment_ids and "
                       "decoder_segment_ids")
    enc_valid = None if enc_seg is not None else enc_tokens > 0
    return _apply(self.module, params, (enc_tokens, jnp.asarray(batch["decoder_input_tokens"])),
                  dict(enc_valid_BL=enc_valid, enc_segment_ids_BL=enc_seg,
                       dec_segment_ids_BL=dec_seg), rngs, mutable)

  def prompts(self, batch):
    tokens_BL = np.asarray(batch["encoder_input_tokens"], np.int32)
    valid_BL = tokens_BL > 0
    valid_BL[:, 0] |= ~valid_BL.any(axis=1)  # an all-padding filler row still needs a token
    return tokens_BL, valid_BL


def model_for_config(config: Any, *, loss: losses_lib.LossConfig | None = None,
                     **kwargs: Any) -> BaseModel:
  """The right wrapper for a registered config (decoder-only or encoder-decoder)."""
  module = registry.build_module(config)
  cls = EncoderDecoderModel if hasattr(module, "encode") else DecoderOnlyModel
  return cls(config, loss=loss, module=module, **kwargs)


def model_from_checkpoint(path: str, *, loss: losses_lib.LossConfig | None = None,
                          config_overrides: Mapping[str, Any] | None = None,
                          **kwargs: Any) -> BaseModel:
  """A wrapper whose architecture is read from a checkpoint (no weights are loaded).

  ``path`` is a Hugging Face directory, one of our ``save_model`` directories,
  or a training ``model_dir``. ``config_overrides`` replaces config fields,
  e.g. ``{"dtype": "bfloat16"}``.
  """
  import dataclasses

  from moe_jax.checkpoints.orbax import read_model_config

  config = read_model_config(path)
  if config_overrides:
    config = dataclasses.replace(config, **dict(config_overrides))
  return model_for_config(config, loss=loss, **kwargs)
