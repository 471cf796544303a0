"""Model wrappers: seqio features -> module calls, prefix-LM handling, score and predict."""

import jax
import numpy as np
import pytest

from moe_jax import decoding
from moe_jax.checkpoints import save_model
from moe_jax.models.decoder import DecoderConfig
from moe_jax.models.t5 import T5Config
from moe_jax.train import losses
from moe_jax.train.wrappers import (DecoderOnlyModel, EncoderDecoderModel, model_for_config,
                                  model_from_checkpoint)

DEC = DecoderConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, d_ff=32)
T5 = T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)

# seqio's prefix-LM features for inputs [9, 4, 1] and targets [3, 1] (see its docstring).
PREFIX_LM = {
    "decoder_input_tokens": np.array([[0, 9, 4, 1, 3, 0, 0]], np.int32),
    "decoder_target_tokens": np.array([[9, 4, 1, 3, 1, 0, 0]], np.int32),
    "decoder_loss_weights": np.array([[0, 0, 0, 1, 1, 0, 0]], np.int32),
    "decoder_causal_attention": np.array([[1, 1, 1, 1, 0, 0, 0]], np.int32),
}


def test_decoder_loss_and_score(numpy_params):
  model = DecoderOnlyModel(DEC)
  params = numpy_params(model)
  batch = {k: v for k, v in PREFIX_LM.items() if k != "decoder_causal_attention"}
  logits = jax.jit(lambda p, b: model.apply(p, b)[0])(params, batch)
  loss, metrics = jax.jit(model.loss_fn)(params, batch)
  ref = losses.token_loss(logits, batch["decoder_target_tokens"],
                          batch["decoder_loss_weights"], losses.LossConfig())
  np.testing.assert_allclose(loss, ref.loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["num_tokens"], 2.0)
  ce, _ = losses.cross_entropy_with_z_loss(logits, batch["decoder_target_tokens"])
  np.testing.assert_allclose(jax.jit(model.score_batch)(params, PREFIX_LM),
                             -(ce[0, 3] + ce[0, 4])[None], rtol=1e-5)


def test_prefix_lm_is_refused_unless_allowed(numpy_params):
  model = DecoderOnlyModel(DEC)
  params = numpy_params(model)
  with pytest.raises(NotImplementedError, match="bidirectional prefix"):
    model.loss_fn(params, PREFIX_LM)
  causal = DecoderOnlyModel(DEC, allow_causal_prefix_lm=True)
  plain = {k: v for k, v in PREFIX_LM.items() if k != "decoder_causal_attention"}
  np.testing.assert_allclose(jax.jit(causal.loss_fn)(params, PREFIX_LM)[0],
                             jax.jit(model.loss_fn)(params, plain)[0])


def test_decoder_prompts_and_predict(numpy_params):
  model = DecoderOnlyModel(DEC)
  params = numpy_params(model)
  prompt, valid = model.prompts(PREFIX_LM)
  assert prompt[0, -4:].tolist() == [0, 9, 4, 1] and valid[0].sum() == 4
  with pytest.raises(ValueError, match="decoder_causal_attention"):
    model.prompts({"decoder_input_tokens": PREFIX_LM["decoder_input_tokens"]})
  got = model.predict_batch(params, PREFIX_LM, max_new_tokens=3)
  want = decoding.generate(model.module, params, [[0, 9, 4, 1]], max_new_tokens=3)
  np.testing.assert_array_equal(got, want.tokens_BN)


def test_encoder_decoder_features(numpy_params):
  model = EncoderDecoderModel(T5)
  params = numpy_params(model)
  packed = {
      "encoder_input_tokens": np.array([[5, 6, 1, 7, 1, 0]], np.int32),
      "encoder_segment_ids": np.array([[1, 1, 1, 2, 2, 0]], np.int32),
      "encoder_positions": np.array([[0, 1, 2, 0, 1, 0]], np.int32),
      "decoder_input_tokens": np.array([[0, 8, 0, 9, 0]], np.int32),
      "decoder_target_tokens": np.array([[8, 1, 9, 1, 0]], np.int32),
      "decoder_loss_weights": np.array([[1, 1, 1, 1, 0]], np.int32),
      "decoder_segment_ids": np.array([[1, 1, 2, 2, 0]], np.int32),
      "decoder_positions": np.array([[0, 1, 0, 1, 0]], np.int32),
  }
  apply = jax.jit(lambda p, b: model.apply(p, b)[0])
  logits = apply(params, packed)
  # The second packed example equals the same example alone, unpacked.
  alone = {"encoder_input_tokens": np.array([[7, 1]], np.int32),
           "decoder_input_tokens": np.array([[0, 9]], np.int32)}
  np.testing.assert_allclose(apply(params, alone)[0], logits[0, 2:4], atol=1e-5)
  prompt, valid = model.prompts({"encoder_input_tokens": np.array([[5, 1, 0], [0, 0, 0]])})
  assert valid.tolist() == [[True, True, False], [True, False, False]]
  with pytest.raises(ValueError, match="use DecoderOnlyModel"):
    EncoderDecoderModel(DEC)
  with pytest.raises(ValueError, match="use EncoderDecoderModel"):
    DecoderOnlyModel(T5)


def test_model_from_checkpoint(tmp_path, numpy_params):
  save_model(tmp_path / "t5", T5, numpy_params(EncoderDecoderModel(T5)))
  model = model_from_checkpoint(str(tmp_path / "t5"), config_overrides={"dtype": "bfloat16"})
  assert isinstance(model, EncoderDecoderModel) and model.config == T5.replace(dtype="bfloat16")
  assert isinstance(model_for_config(DEC), DecoderOnlyModel)
  assert jax.tree.structure(model.abstract_boxed_params()) is not None
