"""The PEFT sweep: rank classification vs a naive loop, routing statistics, gins, quick sweep."""

import json
from pathlib import Path

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.peft_sweep import analysis, sweep
from moe_jax import peft
from moe_jax.cli import configurables
from moe_jax.data import instruct
from moe_jax.data.tasks import default_vocabulary
from moe_jax.models.decoder import Decoder, DecoderConfig
from moe_jax.models.t5 import T5, T5Config
from moe_jax.train.wrappers import DecoderOnlyModel, EncoderDecoderModel

from peft_util import random_params, randomize_adapters, rng_key

VOCAB = 264  # the byte vocabulary's 259 ids, rounded up
CONFIGS = {
    "t5": T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                   num_decoder_layers=1, num_heads=2, relative_attention_num_buckets=8,
                   relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
                   tie_word_embeddings=False),
    "decoder": DecoderConfig(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2,
                             num_kv_heads=1, d_ff=32, max_seq_len=128),
}


def _wrapper(kind, peft_config=None):
  config = CONFIGS[kind]
  if kind == "t5":
    base = EncoderDecoderModel(config, module=T5(config=config))
  else:
    base = DecoderOnlyModel(config, module=Decoder(config=config))
  params = random_params(base.module)
  model = peft.adapted_model(base, peft_config, allow_causal_prefix_lm=True)
  if peft_config is not None:
    params = randomize_adapters(peft.init_adapter_params(model.module, params, rng_key()))
  return model, params


def _naive_log_likelihood(module, params, prompt, answer, vocab, encoder_decoder):
  """One unpadded row per (prompt, answer); the answer's log-probability summed by hand."""
  inp = list(vocab.encode(prompt)) + [1]
  tgt = list(vocab.encode(answer)) + [1]
  if encoder_decoder:
    logits, _ = module.apply({"params": params}, jnp.asarray([inp]),
                             jnp.asarray([[0] + tgt[:-1]]))
    first = 0
  else:
    seq = inp + tgt
    logits, _ = module.apply({"params": params}, jnp.asarray([[0] + seq[:-1]]))
    first = len(inp)
  logp = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1))
  return sum(float(logp[first + j, t]) for j, t in enumerate(tgt))


@pytest.mark.parametrize("kind,method", [("t5", "mov"), ("decoder", "molora")])
def test_rank_classification_equals_a_naive_per_choice_loop(kind, method):
  cfg = peft.PeftConfig(method=method, num_experts=3)
  model, params = _wrapper(kind, cfg)
  vocab = default_vocabulary()
  examples = (instruct.instruct_examples("instruct_first", "validation", num_examples=2)
              + instruct.instruct_examples("instruct_sentiment", "validation", num_examples=2))
  score = jax.jit(model.score_batch)
  preds, scores = analysis.rank_classify(
      lambda f: score(params, {k: v for k, v in f.items() if k != "decoder_causal_attention"}),
      examples, vocab, encoder_decoder=kind == "t5", inputs_length=80, targets_length=12,
      batch_size=8)
  for ex, pred, s_C in zip(examples, preds, scores):
    naive = [_naive_log_likelihood(model.module, params, ex.inputs, c, vocab, kind == "t5")
             for c in ex.choices]
    np.testing.assert_allclose(s_C, naive, rtol=1e-4, atol=1e-4)
    assert pred == int(np.argmax(naive))
  assert analysis.accuracy(preds, examples) == np.mean(
      [p == e.label for p, e in zip(preds, examples)])


def test_routing_statistics_are_distributions_per_task_and_layer(tmp_path):
  model, params = _wrapper("t5", peft.PeftConfig(method="mov", num_experts=4))
  by_task = instruct.by_task(["instruct_parity", "instruct_first"], "validation", 6)
  r = analysis.routing_by_task(model, params, by_task, default_vocabulary(),
                               inputs_length=80, targets_length=12, batch_size=4)
  assert r["tasks"] == ["instruct_parity", "instruct_first"]
  assert set(r["layers"]) == {"encoder/layers_0", "decoder/layers_0"}
  assert "encoder/layers_0/mlp/peft_hidden" in r["sites"]
  for v_TE in list(r["layers"].values()) + list(r["sites"].values()):
    assert v_TE.shape == (2, 4)
    np.testing.assert_allclose(v_TE.sum(axis=1), 1.0, atol=1e-5)
  assert not np.allclose(r["layers"]["encoder/layers_0"][0], r["layers"]["encoder/layers_0"][1])
  path = analysis.plot_routing(r, str(tmp_path / "r.png"), title="t",
                               held_out=["instruct_first"])
  assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="no routers"):
    analysis.routing_by_task(*_wrapper("t5", peft.PeftConfig(method="ia3")), by_task,
                             default_vocabulary(), inputs_length=80, targets_length=12)


def test_adapted_model_wraps_without_touching_the_base():
  base = DecoderOnlyModel(CONFIGS["decoder"], module=Decoder(config=CONFIGS["decoder"]))
  full = peft.adapted_model(base, None, allow_causal_prefix_lm=True)
  assert full.module is base.module and full.allow_causal_prefix_lm
  assert not base.allow_causal_prefix_lm
  mov = peft.adapted_model(base, peft.PeftConfig(method="mov", num_experts=2))
  assert peft.peft_config_of(mov.module).num_experts == 2
  assert peft.peft_config_of(base.module) is None
  with pytest.raises(ValueError, match="PeftConfig or None"):
    peft.adapted_model(base, {"method": "mov"})


def test_every_sweep_gin_parses_and_configures_its_method():
  gin_dir = configurables.GIN_CONFIGS_DIR / sweep.GIN_DIR
  tiers = {"finetune", "peft", "pretrain_t5", "pretrain_decoder"}
  assert {p.stem for p in gin_dir.glob("*.gin")} == set(sweep.METHODS) | tiers
  expected = {"ia3": ("ia3", 1, None), "lora": ("lora", 1, None), "mov5": ("mov", 5, None),
              "mov10": ("mov", 10, None), "mov30": ("mov", 30, None),
              "molora2": ("molora", 2, None), "molora10": ("molora", 10, None),
              "mov10_top1": ("mov", 10, 1), "mov10_top2": ("mov", 10, 2)}
  budgets = set()
  for method in sweep.METHODS:
    text = (gin_dir / f"{method}.gin").read_text()
    assert text.startswith("# Experiment") and "Required macros" in text
    configurables.parse_gin([f"{sweep.GIN_DIR}/{method}.gin"],
                            ["INIT_CHECKPOINT = '/nowhere'", "MODEL_DIR = '/tmp/nowhere'"])
    budgets.add((gin.query_parameter("%TRAIN_STEPS"), gin.query_parameter("%BATCH_SIZE")))
    if method == "full":
      assert gin.query_parameter("%PEFT") is None
      continue
    cfg = configurables.configured(peft.PeftConfig)()
    assert (cfg.method, cfg.num_experts, cfg.top_k) == expected[method]
  assert len(budgets) == 1  # one step budget and batch for every method
  for backbone in sweep.BACKBONES:
    configurables.parse_gin([f"{sweep.GIN_DIR}/pretrain_{backbone}.gin"],
                            ["MODEL_DIR = '/tmp/nowhere'"])


def test_quick_sweep_writes_the_table_and_heatmap(tmp_path, capsys):
  assert sweep.main(["--out", str(tmp_path), "--quick"]) == 0
  table = (tmp_path / "results.md").read_text()
  assert "| t5 | full fine-tuning | 100 |" in table and "MoV-10" in table
  rows = json.loads((tmp_path / "results.json").read_text())["rows"]
  assert [r["method"] for r in rows] == ["none", "full", "mov10"]
  for r in rows:
    assert 0.0 <= r["held_in"] <= 1.0 and 0.0 <= r["held_out"] <= 1.0
    assert set(r["tasks"]) == set(instruct.TASK_NAMES)
  assert 0.0 < rows[2]["trainable_percent"] < 100.0
  png = tmp_path / "routing_t5_mov10.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  routing = json.loads((tmp_path / "routing_t5_mov10.json").read_text())
  assert routing["tasks"] == list(instruct.TASK_NAMES)
  assert "[sweep 3/3] t5 mov10" in capsys.readouterr().out


def test_molora_parameters_get_partition_specs():
  """MoLoRA's ``A [D, E, R]`` has an expert and a rank dim; both must map to (replicated) rules."""
  from moe_jax.train.partitioner import Partitioner, PartitionerConfig

  model, _ = _wrapper("t5", peft.PeftConfig(method="molora", num_experts=2))
  specs = Partitioner(PartitionerConfig()).param_specs(model.abstract_boxed_params())
  a = specs["encoder"]["layers_0"]["attn"]["peft_q"]["lora_a"]
  assert tuple(a) == (None, None, None)
