"""Shared helpers of the PEFT tests (``import peft_util``): tiny backbones, NumPy parameters.

Parameters come from NumPy in the shapes ``jax.eval_shape(module.init)``
reports: compiling flax's init (a threefry + truncated normal per parameter)
costs seconds per model on CPU and would dominate these tests.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe_jax.models.decoder import Decoder, DecoderConfig
from moe_jax.models.t5 import T5, T5Config

VOCAB = 61
BACKBONES = {
    "decoder": DecoderConfig(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=4,
                             num_kv_heads=2, d_ff=32, qkv_bias=True),
    "decoder_parallel": DecoderConfig(vocab_size=VOCAB, d_model=16, num_layers=1, num_heads=4,
                                      num_kv_heads=1, d_ff=32, parallel_block=True,
                                      tie_embeddings=True),
    "t5_v1_0": T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                        num_decoder_layers=1, num_heads=4, relative_attention_num_buckets=8,
                        relative_attention_max_distance=16, feed_forward_proj="relu",
                        tie_word_embeddings=True),
    "t5_v1_1": T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                        num_decoder_layers=1, num_heads=4, relative_attention_num_buckets=8,
                        relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
                        tie_word_embeddings=False),
}


def rng_key(seed: int = 0) -> jax.Array:
  """An RBG key: initialising adapters with it compiles ~3x faster on CPU than threefry."""
  return jax.random.key(seed, impl="unsafe_rbg")


def random_params(module, seed: int = 0) -> dict:
  """NumPy-random (unboxed) parameters of a backbone module."""
  tokens = [jnp.zeros((1, 1), jnp.int32)] * (2 if hasattr(module, "encode") else 1)
  shapes = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *tokens))
                         ["params"])
  rng = np.random.default_rng(seed)

  def make(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
    return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(make, shapes)


def backbone(kind: str, seed: int = 0):
  config = BACKBONES[kind]
  module = T5(config=config) if kind.startswith("t5") else Decoder(config=config)
  return config, module, random_params(module, seed)


def with_adapters(model, base: dict, seed: int = 1, identity: bool = False) -> dict:
  """``base`` plus adapters made with NumPy in the adapted ``model``'s shapes.

  Identity-initialised like :func:`moe_jax.peft.init_adapter_params` (ones,
  ``B = 0``, random ``A`` and routers) when ``identity``, else randomised;
  cheaper than compiling the real initialisers, which a few tests cover.
  """
  from moe_jax import peft
  _, shapes = peft.split_params(peft.param_shapes(model))
  rng = np.random.default_rng(seed)

  def make(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
      return np.ones(x.shape, np.float32)
    if name == "lora_b":
      return np.zeros(x.shape, np.float32)
    return (rng.standard_normal(x.shape) * 0.3).astype(np.float32)

  params = peft.merge_params(base, jax.tree_util.tree_map_with_path(make, shapes))
  return params if identity else randomize_adapters(params, seed)


def randomize_adapters(params: dict, seed: int = 1) -> dict:
  """Adapters moved away from their identity initialisation (backbone leaves untouched)."""
  rng = np.random.default_rng(seed)

  def make(path, x):
    names = [str(getattr(p, "key", p)) for p in path]
    if not any(n.startswith("peft_") for n in names):
      return x
    noise = rng.standard_normal(np.shape(x)).astype(np.float32)
    if names[-1] == "scale":
      return 1.0 + 0.3 * noise
    if names[-1] == "kernel":  # router
      return noise
    return 0.3 * noise

  return jax.tree_util.tree_map_with_path(make, params)


def inputs(kind: str):
  """Tokens and masks for ``kind`` (row 1 right-padded)."""
  rng = np.random.default_rng(3)
  if kind.startswith("t5"):
    enc = rng.integers(2, VOCAB, (2, 7))
    dec = rng.integers(2, VOCAB, (2, 5))
    enc_valid = np.ones((2, 7), bool)
    enc_valid[1, 5:] = False
    dec_valid = np.ones((2, 5), bool)
    dec_valid[1, 4:] = False
    return (jnp.asarray(enc), jnp.asarray(dec)), dict(enc_valid_BL=jnp.asarray(enc_valid),
                                                      dec_valid_BL=jnp.asarray(dec_valid))
  tokens = rng.integers(2, VOCAB, (2, 7))
  valid = np.ones((2, 7), bool)
  valid[1, 5:] = False
  return (jnp.asarray(tokens),), dict(valid_BL=jnp.asarray(valid))


_JITTED: dict = {}


def logits(module, params, kind: str, *, jit: bool = True):
  """Logits on :func:`inputs` (one compile per module and kind).

  ``jit=False`` runs op by op, where an added zero or a multiplication by one
  is exact; under ``jit`` XLA may fuse such ops into neighbouring kernels and
  round the last bit differently.
  """
  args, kw = inputs(kind)
  fn = lambda p: module.apply({"params": p}, *args, **kw)  # noqa: E731
  if jit:
    key = (module, kind)
    if key not in _JITTED:
      _JITTED[key] = jax.jit(fn)
    fn = _JITTED[key]
  out, _ = fn(params)
  return np.asarray(out)


def valid_logits(module, params, tokens, valid):
  """Logits of ``module.apply(params, tokens, valid_BL=valid)`` (jitted)."""
  return np.asarray(jax.jit(lambda p: module.apply({"params": p}, tokens, valid_BL=valid))(
      params)[0])


def _train_step(model, params, tokens, valid):
  """One masked Adam step on cross-entropy plus every sown auxiliary loss."""
  from moe_jax import peft
  mask = peft.trainable_mask(params)
  targets = jnp.roll(tokens, -1, axis=1)

  def loss_fn(p):
    (out, _), state = model.apply({"params": p}, tokens, valid_BL=valid,
                                  mutable=[peft.AUX_LOSS_COLLECTION, peft.METRICS_COLLECTION])
    ce = optax.softmax_cross_entropy_with_integer_labels(out, targets).mean()
    return ce + peft.total_aux_loss(state)

  tx = peft.masked_optimizer(optax.adam(1e-2), mask)

  @jax.jit
  def step(p):
    updates, _ = tx.update(jax.grad(loss_fn)(p), tx.init(p), p)
    return peft.apply_masked_updates(p, updates, mask)

  return step(params)


def check_adapted(module, base, cfg, tokens, valid):
  """The promises of :func:`peft.adapt` on ``module``; returns ``(model, params)``.

  The backbone's parameter names and values unchanged, its logits at
  initialisation, a training step that leaves it bit for bit, trained adapters
  that change the output.
  """
  from moe_jax import peft
  model = peft.adapt(module, cfg)
  assert isinstance(model, type(module)) and peft.peft_config_of(model) == cfg
  params = peft.init_adapter_params(model, base, rng_key())
  backbone, adapters = peft.split_params(params)
  # The backbone's parameters, under their own names, untouched.
  assert jax.tree.structure(backbone) == jax.tree.structure(base)
  for got, want in zip(jax.tree.leaves(backbone), jax.tree.leaves(base)):
    assert got is want
  assert adapters
  # Identity at initialisation.
  ref = valid_logits(module, base, tokens, valid)
  np.testing.assert_allclose(valid_logits(model, params, tokens, valid), ref, rtol=0,
                             atol=2e-6)
  # A training step moves the adapters and leaves the backbone bit for bit.
  new_backbone, new_adapters = peft.split_params(_train_step(model, params, tokens, valid))
  for got, want in zip(jax.tree.leaves(new_backbone), jax.tree.leaves(base)):
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32),
                                  np.asarray(want).view(np.uint32))

  def moved(path, a, b):
    if str(path[-1].key) in ("lora_b", "scale"):
      assert not np.array_equal(a, b), jax.tree_util.keystr(path)

  jax.tree_util.tree_map_with_path(moved, new_adapters, adapters)
  # Trained adapters change the output.
  out = valid_logits(model, randomize_adapters(params), tokens, valid)
  assert np.abs(out - ref).max() > 1e-3
  return model, params
