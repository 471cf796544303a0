"""The upcycling-method registry: the one list the CLI and the Python API read."""

import dataclasses

import jax
import numpy as np
import pytest

import moe_jax as mj
from moe_jax.checkpoints import LoadedModel
from moe_jax.cli import upcycle as cli
from moe_jax.models import registry
from moe_jax.upcycle import methods

from upcycle_helpers import make_branch, make_config, make_params


def _loaded(config, params, name):
  return LoadedModel(config=config, module=registry.build_module(config), params=params,
                     source=name)


def test_cli_and_api_offer_the_registered_methods():
  assert set(methods.METHODS) == {"sparse", "btx", "bam"}
  args = cli.parse_args(["--method", "bam", "--checkpoints", "a", "b", "--out", "o"])
  assert args.method == "bam"
  with pytest.raises(SystemExit):  # argparse choices come from the registry
    cli.parse_args(["--method", "dense", "--checkpoints", "a", "--out", "o"])
  with pytest.raises(ValueError, match="method must be 'sparse', 'btx' or 'bam', got 'dense'"):
    methods.check("dense", 1)


@pytest.mark.parametrize("name, n, kw, match", [
    ("sparse", 2, dict(num_experts=2), "exactly one checkpoint"),
    ("sparse", 1, {}, "needs num_experts"),
    ("btx", 1, {}, "mixes several dense models"),
    ("bam", 2, dict(num_experts=3), "one expert per dense model"),
    ("btx", 2, dict(options={"shared_kv": True}), "BAM options"),
    ("bam", 2, dict(options={"noise_std": 0.1}), "sparse upcycling options"),
])
def test_check_names_what_is_wrong(name, n, kw, match):
  with pytest.raises(ValueError, match=match):
    methods.check(name, n, owner="t", **kw)


def test_api_uses_the_methods_defaults_and_a_registered_method():
  cfg = make_config(parallel_block=True)
  seed = make_params(cfg)
  branches = [_loaded(cfg, make_branch(seed, i), f"b{i}") for i in range(2)]
  bam = mj.upcycle_model(branches, method="bam")
  assert bam.config.moe.num_selected == methods.METHODS["bam"].default_top_k == 1
  calls = []

  def build(configs, params, **kw):
    calls.append(kw)
    return methods.METHODS["btx"].build(configs, params, **kw)

  methods.register_method(dataclasses.replace(methods.METHODS["btx"], name="btx_copy",
                                              build=build))
  try:
    out = mj.upcycle_model(branches, method="btx_copy", seed=3)
  finally:
    del methods.METHODS["btx_copy"]
  ref = mj.upcycle_model(branches, method="btx", seed=3)
  assert calls and calls[0]["seed"] == 3 and calls[0]["moe"].num_selected == 2
  for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(ref.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
