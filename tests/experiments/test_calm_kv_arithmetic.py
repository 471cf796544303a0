"""The KV-arithmetic reproduction: prompt encoding matches training, quick run end to end."""

import json

import numpy as np
import pytest

from calm_jax.tasks import KVArithmetic, kv_task
from experiments.calm_kv_arithmetic import repro
from moe_jax.api import encode_prompts
from moe_jax.checkpoints import LoadedModel
from moe_jax.data import pipeline
from moe_jax.data.tasks import default_vocabulary
from moe_jax.models import registry


def test_eval_prompts_are_encoded_as_training_presents_inputs():
  # Greedy evaluation must see what training saw before the targets (seqio's
  # prefix-LM features: leading 0, inputs, EOS); a prompt without EOS makes a
  # trained model answer with EOS at once.
  name = kv_task("num_math", num_keys=12, value_range=(1, 12), num_train=16, num_eval=8,
                 prefix="calm_test_encoding_")
  ds = pipeline.get_dataset(mixture_or_task_name=name, split="validation",
                            task_feature_lengths={"inputs": 32, "targets": 8}, batch_size=1,
                            feature_converter="prefix_lm", pack=False, shuffle=False)
  gen = KVArithmetic(num_keys=12, value_range=(1, 12))
  example = gen.examples("num_math", "validation", 8)[0]
  vocab = default_vocabulary()
  config = repro._decoder_config(vocab.vocab_size, 16, 1, repro.ReproConfig())
  model = LoadedModel(config=config, module=registry.build_module(config), params={},
                      source="test")
  (prompt,) = encode_prompts(model, [example["inputs"]], vocabulary=vocab)
  feats = next(ds.as_numpy_iterator())
  inputs = feats["decoder_input_tokens"][0]
  np.testing.assert_array_equal(inputs[:len(prompt)], prompt)
  targets = feats["decoder_target_tokens"][0]
  answer = vocab.encode(example["targets"])
  np.testing.assert_array_equal(targets[len(prompt) - 1:len(prompt) - 1 + len(answer)], answer)


def test_quick_reproduction_writes_table_json_and_plot(tmp_path):
  results = repro.run(repro.ReproConfig(**repro.QUICK), tmp_path, progress=False)
  assert set(results) == {"m_A", "m_B", "CALM"}
  for accs in results.values():
    assert set(accs) == {"kv_subs", "num_math", "kv_math", "kv_math_comp", "kv_math_new"}
    assert all(0.0 <= v <= 100.0 for v in accs.values())
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["results"] == results and saved["config"]["steps_calm"] == repro.QUICK["steps_calm"]
  table = (tmp_path / "results.md").read_text()
  assert table.splitlines()[0].startswith("| model | KV-SUBS | NUM-MATH | KV-MATH |")
  probe = saved["value_probe_units_tens_by_layer"]
  assert len(probe) == repro.QUICK["layers_a"] and all(0 <= a <= 1 for p in probe for a in p)
  assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # each model directory carries the shared vocabulary (keys as single tokens)
  from moe_jax import api
  from moe_jax.api import _vocabulary
  key = "<" + KVArithmetic(num_keys=12, value_range=(1, 12)).composition_keys[0] + ">"
  for name in ("m_a", "m_b"):
    vocab = _vocabulary(api.load(tmp_path / name), None)
    assert vocab.eos_id == 1 and vocab.pad_id == 0 and len(vocab.encode(key + "+3=")) == 4


def test_shared_base_m_a_is_fine_tuned_from_m_b_with_its_embeddings_frozen(tmp_path):
  from moe_jax.checkpoints import load_checkpoint

  rc = repro.ReproConfig(**{**repro.QUICK, "steps_calm": 2, "num_eval": 2}, tokens="numbers",
                         shared_base=True, freeze_m_a_embeddings=True, embed_init_std=0.02,
                         tie_embeddings=True, layer_pairs=((1, 0),))
  repro.run(rc, tmp_path, progress=False)
  m_a, m_b = load_checkpoint(tmp_path / "m_a"), load_checkpoint(tmp_path / "m_b")
  assert m_a.config == m_b.config and m_b.config.tie_embeddings
  np.testing.assert_array_equal(m_a.params["embed"]["embedding"], m_b.params["embed"]["embedding"])
  assert not np.array_equal(m_a.params["layers_0"]["mlp"]["wi_0"]["kernel"],
                            m_b.params["layers_0"]["mlp"]["wi_0"]["kernel"])
  assert np.asarray(m_b.params["embed"]["embedding"]).std() < 0.1  # embed_init_std took
  saved = json.loads((tmp_path / "results.json").read_text())["config"]
  assert saved["layer_pairs"] == [[1, 0]]
  recipe = json.loads((tmp_path / "m_a" / "repro.json").read_text())
  assert recipe["shared_base"] and recipe["init"]["steps_b"] == rc.steps_b
  with pytest.raises(ValueError, match="d_model_a/layers_a"):
    repro.run(repro.ReproConfig(**{**repro.QUICK, "d_model_a": 48}, shared_base=True), tmp_path)


def test_prompts_need_a_vocabulary_with_eos(tmp_path):
  # A bare tokenizer.json whose EOS is not named anywhere: a clear error, not a crash
  # inside padding.
  from calm_jax.tasks import kv_tokenizer, kv_vocabulary
  from moe_jax.data.vocabularies import HFTokenizerVocabulary

  kv_tokenizer().save(str(tmp_path / "tokenizer.json"))
  bare = HFTokenizerVocabulary(tmp_path)
  config = repro._decoder_config(bare.vocab_size, 16, 1, repro.ReproConfig())
  model = LoadedModel(config=config, module=registry.build_module(config), params={},
                      source="tiny")
  with pytest.raises(ValueError, match="tiny: .*no EOS"):
    encode_prompts(model, ["1+2="], vocabulary=bare)
  kv = kv_vocabulary(kv_tokenizer())
  (prompt,) = encode_prompts(model, ["1+2="], vocabulary=kv)
  assert prompt[0] == 0 and prompt[-1] == 1
  assert encode_prompts(model, ["1+2="], vocabulary=kv, task_format=False) == [prompt[1:-1]]
  with pytest.raises(ValueError, match="no prompts"):
    encode_prompts(model, [], vocabulary=kv)


def test_oracle_m_a_holds_each_keys_value_digits_at_its_token():
  import jax.numpy as jnp

  from calm_jax.tasks import kv_tokenizer, kv_vocabulary
  from moe_jax.decoding import pad_prompts

  gen = KVArithmetic(num_keys=100, value_range=(0, 99), num_operands=(2, 2), ops=("+", "-"))
  vocab = kv_vocabulary(kv_tokenizer(gen))
  rc = repro.ReproConfig()
  oracle = repro.oracle_augmenting_model(gen, vocab, 32, 3, rc)
  ex = gen.examples("kv_subs", "test", 1)[0]
  ids = encode_prompts(oracle, [ex["inputs"]], vocabulary=vocab)
  tokens, valid = pad_prompts(ids, side="right")
  _, state = oracle.module.apply({"params": oracle.params}, jnp.asarray(tokens),
                                 valid_BL=jnp.asarray(valid), sow_hidden=True,
                                 mutable=["intermediates"])
  hidden = state["intermediates"]["hidden"]
  assert len(hidden) == 3
  key_ids = {vocab.encode(f"<{k}>")[0]: v for k, v in gen.table.items()}
  for layer in hidden:  # every layer passes the code on unchanged
    h = np.asarray(layer)[0]
    for pos, tok in enumerate(tokens[0]):
      want = np.zeros(32)
      if tok in key_ids:  # the digits as written: place p, digit d -> 10 p + d
        digits = str(key_ids[tok])[::-1]
        want[[10 * p + int(d) for p, d in enumerate(digits)]] = np.sqrt(32 / 2)
      np.testing.assert_allclose(h[pos], want, atol=1e-6, err_msg=f"token {tok} at {pos}")
  # the ridge probe (fit on 20 keys) reads the units digit exactly; tens mostly
  assert all(units == 1.0 and tens > 0.8 for units, tens in repro.value_probe(oracle, gen, vocab))
  with pytest.raises(ValueError, match="d_model 16 < 20"):
    repro.oracle_augmenting_model(gen, vocab, 16, 1, rc)
  chars = kv_vocabulary(kv_tokenizer())
  with pytest.raises(ValueError, match=r"key <\w+> is \d+ tokens"):
    repro.oracle_augmenting_model(gen, chars, 32, 1, rc)


def test_quick_reproduction_with_the_oracle_m_a(tmp_path):
  rc = repro.ReproConfig(**{**repro.QUICK, "steps_calm": 2, "num_eval": 2}, oracle_m_a=True)
  repro.run(rc, tmp_path, progress=False)
  assert not (tmp_path / "m_a").exists()
  assert (tmp_path / "m_a_oracle" / "model_config.json").exists()
  saved = json.loads((tmp_path / "results.json").read_text())
  assert len(saved["value_probe_units_tens_by_layer"]) == rc.layers_a
  meta = json.loads((tmp_path / "calm" / "composition.json").read_text())
  assert str(tmp_path / "m_a_oracle") in json.dumps(meta)
