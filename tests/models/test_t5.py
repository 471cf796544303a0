"""T5 backbone and HF converter: parity with transformers' T5ForConditionalGeneration.

Tiny random HF models are built here (no downloads). Relative-position
buckets are set to 16 buckets / max distance 20 and sequences are ~24 long so
the exact, logarithmic and clamped bucket ranges are all exercised.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flax.linen as nn  # noqa: E402

from moe_jax.checkpoints.hf_common import CheckpointError, TensorGetter  # noqa: E402
from moe_jax.checkpoints.hf_t5 import T5Converter  # noqa: E402
from moe_jax.models.t5 import T5, T5Config, relative_position_bucket  # noqa: E402

CONV = T5Converter()
VARIANTS = {
    "v1_0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
SIZES = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
             num_heads=4, relative_attention_num_buckets=16, relative_attention_max_distance=20)
B, L_ENC, L_DEC = 2, 24, 22


def _make_hf(variant: str, seed: int):
  torch.manual_seed(seed)
  cfg = transformers.T5Config(**SIZES, **VARIANTS[variant], dropout_rate=0.0,
                              attn_implementation="eager")
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:  # HF initialises norms to 1; make the mapping observable
        p.uniform_(0.5, 1.5)
    if variant == "v1_1":
      # transformers >= 5 ties lm_head to shared on construction whatever the config says
      # (from_pretrained keeps a checkpoint's distinct lm_head); give v1.1 its own head.
      model.lm_head.weight = torch.nn.Parameter(torch.randn(99, 32) * 0.2)
  return model


def _state_dict_np(model) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _getter(sd: dict) -> TensorGetter:
  return TensorGetter(lambda n: sd[n], set(sd), "test-checkpoint")


def _inputs():
  rng = np.random.default_rng(0)
  enc = rng.integers(2, 99, (B, L_ENC))
  dec = rng.integers(2, 99, (B, L_DEC))
  dec[:, 0] = 0  # decoder start token
  enc_valid = np.ones((B, L_ENC), bool)
  enc_valid[1, 15:] = False
  enc[1, 15:] = 0
  dec_valid = np.ones((B, L_DEC), bool)
  dec_valid[1, 18:] = False
  return enc, dec, enc_valid, dec_valid


def _hf_logits(model, enc, dec, enc_valid, dec_valid) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc_valid.astype(np.int64)),
                decoder_input_ids=torch.tensor(dec),
                decoder_attention_mask=torch.tensor(dec_valid.astype(np.int64)))
  return out.logits.numpy()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def case(request):
  variant = request.param
  hf = _make_hf(variant, seed=0)
  sd = _state_dict_np(hf)
  config = CONV.config_from_hf(hf.config.to_dict())
  params = CONV.params_from_hf(_getter(sd), config)
  enc, dec, enc_valid, dec_valid = _inputs()
  ref = _hf_logits(hf, enc, dec, enc_valid, dec_valid)
  model = T5(config=config)
  ours, cache = jax.jit(lambda p: model.apply({"params": p}, enc, dec, enc_valid_BL=enc_valid,
                                              dec_valid_BL=dec_valid))(params)
  assert cache is None
  return dict(variant=variant, hf=hf, sd=sd, config=config, params=params, ref=ref,
              ours=np.asarray(ours), inputs=(enc, dec, enc_valid, dec_valid))


# ----------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 20), (32, 17), (64, 300)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bucket_matches_hf(num_buckets, max_distance, bidirectional):
  ref_fn = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
  rel = np.arange(-2000, 2001)
  ours = relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional,
                                  num_buckets=num_buckets, max_distance=max_distance)
  ref = ref_fn(torch.tensor(rel), bidirectional=bidirectional, num_buckets=num_buckets,
               max_distance=max_distance).numpy()
  np.testing.assert_array_equal(np.asarray(ours), ref)


def test_config_validation_names_field():
  with pytest.raises(ValueError, match="d_model"):
    T5Config(**{**SIZES, "d_model": 0})
  with pytest.raises(ValueError, match="feed_forward_proj"):
    T5Config(**SIZES, feed_forward_proj="gated-silu")
  with pytest.raises(ValueError, match="relative_attention_max_distance"):
    T5Config(**{**SIZES, "relative_attention_num_buckets": 32,
                "relative_attention_max_distance": 16})


# ----------------------------------------------------------------------------- configs


def test_config_from_hf_and_back(case):
  c = case["config"]
  tied = case["variant"] == "v1_0"
  assert c == T5Config(**SIZES, **VARIANTS[case["variant"]])
  hf_dict = CONV.config_to_hf(c)
  assert hf_dict["architectures"] == ["T5ForConditionalGeneration"]
  hf_cfg = transformers.T5Config.from_dict(json.loads(json.dumps(hf_dict)))
  assert hf_cfg.scale_decoder_outputs == tied
  assert hf_cfg.is_gated_act == (not tied)
  assert hf_cfg.dense_act_fn == ("relu" if tied else "gelu_new")
  assert hf_cfg.num_decoder_layers == 3
  assert CONV.config_from_hf(hf_dict) == c
  # transformers < 5 style config: only tie_word_embeddings says which head.
  legacy = {k: v for k, v in hf_dict.items() if k != "scale_decoder_outputs"}
  assert CONV.config_from_hf(legacy) == c


def test_config_from_hf_rejects_unsupported_ffn():
  hf_dict = {**SIZES, "model_type": "t5", "feed_forward_proj": "gated-silu"}
  with pytest.raises(CheckpointError, match="gated-silu"):
    CONV.config_from_hf(hf_dict)
  hf_dict = {**SIZES, "model_type": "t5", "feed_forward_proj": "gated-gelu",
             "dense_act_fn": "gelu"}
  with pytest.raises(CheckpointError, match="dense_act_fn"):
    CONV.config_from_hf(hf_dict)
  no_layers = {k: v for k, v in SIZES.items() if k != "num_layers"}
  with pytest.raises(CheckpointError, match="num_layers"):
    CONV.config_from_hf(no_layers)


# ----------------------------------------------------------------------------- params


def test_param_tree_matches_init(case):
  c = case["config"]
  enc, dec, _, _ = case["inputs"]
  shapes = jax.eval_shape(lambda: T5(config=c).init(jax.random.key(0), enc, dec))["params"]
  shapes = nn.unbox(shapes)
  assert jax.tree.structure(shapes) == jax.tree.structure(case["params"])
  jax.tree.map(lambda s, a: np.testing.assert_equal(tuple(s.shape), a.shape), shapes,
               case["params"])
  assert ("lm_head" in case["params"]) == (case["variant"] == "v1_1")


def test_logits_match_hf(case):
  """Teacher-forced logits (``T5.__call__``, computed in the fixture) vs transformers."""
  assert case["ours"].shape == (B, L_DEC, 99)
  np.testing.assert_allclose(case["ours"], case["ref"], atol=1e-4, rtol=0)


def test_cached_decode_matches_full(case):
  enc, dec, enc_valid, dec_valid = case["inputs"]
  model = CONV.module(case["config"])
  params = case["params"]

  @jax.jit
  def start(p):
    enc_BLD = model.apply({"params": p}, enc, enc_valid, method=T5.encode)
    return model.apply({"params": p}, enc_BLD, enc_valid, L_DEC + 2,
                       method=T5.init_decode_cache)

  @jax.jit
  def step(p, tokens, valid, cache):
    return model.apply({"params": p}, tokens, valid_BL=valid, cache=cache, method=T5.decode)

  cache = start(params)
  assert cache.self_attn[0].k.shape == (B, L_DEC + 2, 4, 8)
  assert cache.cross_attn[0].k.shape == (B, L_ENC, 4, 8)
  prefill = 5  # a multi-token chunk first, so the relative bias must use slot offsets
  got = []
  logits, cache = step(params, dec[:, :prefill], dec_valid[:, :prefill], cache)
  got.append(logits)
  for t in range(prefill, L_DEC):
    logits, cache = step(params, dec[:, t:t + 1], dec_valid[:, t:t + 1], cache)
    got.append(logits)
  assert int(cache.index) == L_DEC
  np.testing.assert_allclose(np.concatenate([np.asarray(g) for g in got], axis=1),
                             case["ours"], atol=1e-5, rtol=0)


def test_params_round_trip_and_strict_load(case):
  sd = case["sd"]
  getter = _getter(sd)
  config = case["config"]
  params = CONV.params_from_hf(getter, config)
  assert getter.used == set(sd), f"unused tensors: {sorted(set(sd) - getter.used)}"
  exported = CONV.params_to_hf(params, config)
  assert set(exported) == set(sd)
  for name, value in sd.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)

  fresh = _make_hf(case["variant"], seed=1)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  enc, dec, enc_valid, dec_valid = case["inputs"]
  np.testing.assert_allclose(_hf_logits(fresh, enc, dec, enc_valid, dec_valid), case["ref"],
                             atol=1e-6, rtol=0)


def test_load_hf_save_pretrained_and_export_hf(case, tmp_path):
  """The real file path: HF's save_pretrained -> load_hf; export_hf -> HF's from_pretrained."""
  from moe_jax.checkpoints.hf import export_hf, load_hf

  case["hf"].save_pretrained(str(tmp_path / "hf"))
  loaded = load_hf(tmp_path / "hf")
  assert loaded.config == case["config"]
  assert loaded.is_encoder_decoder
  jax.tree.map(np.testing.assert_array_equal, loaded.params, case["params"])

  enc, dec, enc_valid, dec_valid = case["inputs"]

  export_hf(tmp_path / "ours", case["config"], case["params"])
  back = transformers.T5ForConditionalGeneration.from_pretrained(
      str(tmp_path / "ours"), attn_implementation="eager").eval()
  np.testing.assert_allclose(_hf_logits(back, enc, dec, enc_valid, dec_valid), case["ref"],
                             atol=1e-6, rtol=0)


def test_missing_lm_head_falls_back_to_shared_only_when_untied(case):
  sd = {k: v for k, v in case["sd"].items() if k != "lm_head.weight"}
  params = CONV.params_from_hf(_getter(sd), case["config"])
  if case["variant"] == "v1_1":
    np.testing.assert_array_equal(params["lm_head"]["kernel"], sd["shared.weight"].T)
  else:
    assert "lm_head" not in params


def test_wrong_shape_names_tensor_and_shapes(case):
  name = "decoder.block.1.layer.0.SelfAttention.q.weight"
  sd = dict(case["sd"])
  sd[name] = np.zeros((32, 31), np.float32)
  with pytest.raises(CheckpointError) as err:
    CONV.params_from_hf(_getter(sd), case["config"])
  msg = str(err.value)
  assert name in msg and "(32, 31)" in msg and "(32, 32)" in msg, msg


def test_missing_tensor_is_named(case):
  name = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
  sd = {k: v for k, v in case["sd"].items() if k != name}
  with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
    CONV.params_from_hf(_getter(sd), case["config"])


def test_decode_argument_errors(case):
  model = CONV.module(case["config"])
  enc, dec, _, _ = case["inputs"]
  with pytest.raises(ValueError, match="enc_BLD"):
    model.apply({"params": case["params"]}, dec, method=T5.decode)


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_generation_matches_hf_generate(variant):
  """20 greedy tokens, token-identical to ``generate()``, with encoder padding.

  Equal encoder/decoder depth: transformers 5.24's T5 ``generate`` sizes its
  cache by the encoder depth and fails otherwise.
  """
  from moe_jax import decoding

  torch.manual_seed(3)
  sizes = {**SIZES, "num_decoder_layers": SIZES["num_layers"]}
  cfg = transformers.T5Config(**sizes, **VARIANTS[variant], dropout_rate=0.0,
                              attn_implementation="eager", eos_token_id=1, pad_token_id=0,
                              decoder_start_token_id=0)
  hf = transformers.T5ForConditionalGeneration(cfg).eval()
  config = CONV.config_from_hf(hf.config.to_dict())
  params = CONV.params_from_hf(_getter(_state_dict_np(hf)), config)
  enc, _, enc_valid, _ = _inputs()
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(enc),
                      attention_mask=torch.tensor(enc_valid.astype(np.int64)),
                      max_new_tokens=20, do_sample=False, num_beams=1).numpy()
  ref = ref[:, 1:]  # drop the decoder start token
  ref = np.pad(ref, ((0, 0), (0, 20 - ref.shape[1])), constant_values=0)
  out = decoding.generate(CONV.module(config), params, enc, prompt_valid_BP=enc_valid,
                          max_new_tokens=20, eos_id=1, pad_id=0)
  np.testing.assert_array_equal(out.tokens_BN, ref)
  assert (out.lengths_B > 3).all(), "degenerate reference: EOS almost at once"
