"""Linear projections whose parameters carry logical axis names.

Legend: D model dim, H heads, K kv heads, Dh head dim, F ffn dim.

Kernels are stored input-dims-first (``[D, H, Dh]`` for a query projection,
``[H, Dh, D]`` for the output projection) so that head structure is explicit
in the parameter tree and in the logical axes: the partitioner can shard
``heads`` over ``model`` without reshapes, and checkpoint converters reshape
once at the edge.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]


def default_kernel_init(fan_in_axes: int = 1) -> Initializer:
  """Variance-scaling init with fan-in over the leading ``fan_in_axes`` dims."""
  return nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal",
      in_axis=tuple(range(fan_in_axes)),
      out_axis=-1,
  )


def canonical_dtype(dtype: Dtype) -> jnp.dtype:
  """Accepts ``"bfloat16"`` style strings as well as numpy/jax dtypes."""
  return jnp.dtype(dtype)


class Linear(nn.Module):
  """``y = x · W (+ b)`` contracting the last ``in_dims`` axes of ``x``.

  Attributes:
    features: output feature shape, e.g. ``(H, Dh)`` for a query projection.
    axes: logical axis names of the kernel, input axes first then outputs.
    in_dims: how many trailing axes of the input are contracted.
    use_bias: add a bias of shape ``features`` (logical axes ``axes[in_dims:]``).
    dtype: compute dtype; inputs and parameters are cast to it.
    param_dtype: storage dtype of the parameters.
    kernel_init: initializer; defaults to fan-in variance scaling.
  """

  features: int | Sequence[int]
  axes: Sequence[str]
  in_dims: int = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer | None = None
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_shape = tuple(x.shape[-self.in_dims:])
    if len(self.axes) != len(in_shape) + len(features):
      raise ValueError(
          f"{self.name}: {len(self.axes)} logical axes {tuple(self.axes)} for a kernel of "
          f"rank {len(in_shape) + len(features)} (in {in_shape}, out {features})")
    init = self.kernel_init or default_kernel_init(self.in_dims)
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(init, tuple(self.axes)),
        in_shape + features, canonical_dtype(self.param_dtype))
    dtype = canonical_dtype(self.dtype)
    x = x.astype(dtype)
    kernel = kernel.astype(dtype)
    contract_x = tuple(range(x.ndim - self.in_dims, x.ndim))
    contract_k = tuple(range(self.in_dims))
    y = jax.lax.dot_general(x, kernel, ((contract_x, contract_k), ((), ())))
    if self.use_bias:
      bias = self.param(
          "bias", nn.with_logical_partitioning(self.bias_init, tuple(self.axes[self.in_dims:])),
          features, canonical_dtype(self.param_dtype))
      y = y + bias.astype(dtype)
    return y


def fan_in_normal(stddev_scale: float = 1.0) -> Initializer:
  """Normal init with std ``scale / sqrt(fan_in)`` (T5-style, fan-in on the first dims)."""

  def init(key, shape, dtype=jnp.float32):
    fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else shape[0]
    return jax.random.normal(key, shape, dtype) * (stddev_scale / np.sqrt(fan_in))

  return init
