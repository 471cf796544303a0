"""Feed-forward blocks: gated (SwiGLU, gated-GELU) and plain (ReLU) MLPs.

Legend: B batch, L length, D model dim, F ffn dim.

Parameter names follow t5x for both backbones: ``wi`` (plain) or ``wi_0``
(gate branch, activated) and ``wi_1`` (linear branch), then ``wo``. Keeping
one naming lets the PEFT and MoE code address "the FFN input/output
projections" the same way for T5 and Llama.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.nn.linear import Linear

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def get_activation(name: str) -> Callable[[Array], Array]:
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


class Mlp(nn.Module):
  """``wo(act(wi_0 x) * wi_1 x)`` when gated, else ``wo(act(wi x))``.

  PEFT adapters attach by intercepting the ``wi*`` / ``wo`` projections
  (:mod:`moe_jax.peft.layers`); this module knows nothing of them.
  """

  hidden_dim: int
  out_features: int
  activation: str = "silu"
  gated: bool = True
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = None
  out_kernel_init: Any = None

  @nn.compact
  def __call__(self, x_BLD: Array) -> Array:
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias)
    act = get_activation(self.activation)

    def project(name: str, x: Array, features: int, axes: tuple[str, str], init: Any) -> Array:
      return Linear(features, axes, kernel_init=init, name=name, **common)(x)

    if self.gated:
      gate = project("wi_0", x_BLD, self.hidden_dim, ("embed", "mlp"), self.kernel_init)
      up = project("wi_1", x_BLD, self.hidden_dim, ("embed", "mlp"), self.kernel_init)
      h_BLF = act(gate) * up
    else:
      h_BLF = act(project("wi", x_BLD, self.hidden_dim, ("embed", "mlp"), self.kernel_init))
    h_BLF = nn.with_logical_constraint(h_BLF, ("batch", "length", "mlp"))
    return project("wo", h_BLF, self.out_features, ("mlp", "embed"),
                   self.out_kernel_init or self.kernel_init)
