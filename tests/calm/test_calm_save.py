"""save_composition writes the values of non-contiguous (transposed) NumPy leaves, not their
raw buffers."""

import jax
import numpy as np

from calm_jax import compose_modules, load_composition, save_composition
from moe_jax.checkpoints import LoadedModel
from moe_jax.models import registry
from moe_jax.models.decoder import DecoderConfig

V = 32
ANCHOR = DecoderConfig(vocab_size=V, d_model=16, num_layers=2, num_heads=2, d_ff=32)
AUGMENT = DecoderConfig(vocab_size=V, d_model=8, num_layers=2, num_heads=2, d_ff=16)


def _loaded(config, seed):
  module = registry.build_module(config)
  return LoadedModel(config=config, module=module,
                     params=registry.init_params(module, "decoder", seed=seed), source=f"s{seed}")


def test_transposed_composition_leaves_round_trip(tmp_path):
  anchor, aug = _loaded(ANCHOR, 1), _loaded(AUGMENT, 2)
  module, params = compose_modules(anchor, [aug], num_composition_layers=1,
                                   zero_init_output=False)
  rng = np.random.default_rng(0)
  comp = {k: v for k, v in params.items() if k.startswith("composition_")}
  # every composition leaf as a Fortran-ordered array (a .T view of its transpose)
  comp = jax.tree.map(lambda x: np.asfortranarray(rng.standard_normal(np.shape(x), np.float32)),
                      comp)
  assert any(x.ndim == 2 and not x.flags.c_contiguous for x in jax.tree.leaves(comp))
  save_composition(tmp_path / "comp", module.config, {**params, **comp})
  _, loaded, _ = load_composition(tmp_path / "comp", anchor=anchor, augments=[aug])
  for k, v in comp.items():
    jax.tree.map(np.testing.assert_array_equal, loaded[k], v)
