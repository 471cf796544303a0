"""Adapters on scanned stacks (scan_layers=True): stacked along ``layers``, same function.

A scanned backbone adapts by the same interception as an unrolled one; its
adapters are created inside the scan, so they gain the leading ``layers`` axis
and convert between layouts with the backbone (moe_jax.checkpoints.layout).
"""

import jax
import numpy as np
import pytest

from moe_jax import peft
from moe_jax.checkpoints import LoadedModel, save_model
from moe_jax.checkpoints.layout import match_layout
from moe_jax.models.decoder import Decoder
from moe_jax.models.t5 import T5

from peft_util import BACKBONES, logits, random_params, with_adapters

CASES = {"lora_decoder": ("decoder", dict(method="lora", sites=("q", "v", "ffn_in"))),
         "mov_decoder": ("decoder", dict(method="mov", num_experts=3)),
         "molora_t5": ("t5_v1_1", dict(method="molora", num_experts=2))}


def _pair(kind, peft_cfg):
  """(unrolled adapted, scanned adapted, backbone parameters)."""
  config = BACKBONES[kind].replace(num_layers=2)
  cls = T5 if kind.startswith("t5") else Decoder
  out = []
  for scan in (False, True):
    c = config.replace(scan_layers=scan, remat_policy="full" if scan else "none")
    base = LoadedModel(config=c, module=cls(config=c), params={}, source="test")
    out.append(peft.adapt(base, peft_cfg))
  return out[0], out[1], random_params(cls(config=config))


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapters_on_a_scanned_stack_match_unrolled(case):
  kind, kw = CASES[case]
  unrolled_model, scanned_model, base = _pair(kind, peft.PeftConfig(**kw))
  params = with_adapters(unrolled_model, base)
  shapes = peft.param_shapes(scanned_model)
  stacked = match_layout(params, shapes)
  jax.tree.map(lambda a, s: np.testing.assert_equal(np.shape(a), s.shape), stacked, shapes)
  _, adapters = peft.split_params(stacked)
  stack_root = adapters["decoder"] if kind.startswith("t5") else adapters
  assert "layers" in stack_root and not any(k.startswith("layers_") for k in stack_root)
  np.testing.assert_allclose(logits(scanned_model, stacked, kind),
                             logits(unrolled_model, params, kind), atol=1e-5, rtol=0)


def test_fold_and_adapter_files_on_a_scanned_stack(tmp_path):
  cfg = peft.PeftConfig(method="lora", sites=("q", "v"))
  unrolled_model, scanned_model, base = _pair("decoder", cfg)
  params = with_adapters(unrolled_model, base)
  stacked = match_layout(params, peft.param_shapes(scanned_model))
  folded = peft.fold_adapters(stacked, cfg)
  assert "layers" in folded
  jax.tree.map(np.testing.assert_allclose, match_layout(folded, params),
               peft.fold_adapters(params, cfg))
  # adapters saved from the scanned model load onto the (unrolled) base checkpoint
  save_model(tmp_path / "base", unrolled_model.config, base)
  peft.save_adapters(tmp_path / "lora", stacked, cfg, base_checkpoint=str(tmp_path / "base"))
  loaded = peft.load_adapted(tmp_path / "lora")
  assert loaded.config.scan_layers
  np.testing.assert_allclose(logits(loaded.module, loaded.params, "decoder"),
                             logits(unrolled_model, params, "decoder"), atol=1e-5, rtol=0)
