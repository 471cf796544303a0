"""The upcycling methods, in one registry the CLI and the Python API both read.

``python -m moe_jax.upcycle --method NAME`` (:mod:`moe_jax.cli.upcycle`) and
``moe_jax.upcycle_model(..., method=NAME)`` (:mod:`moe_jax.api`) offer exactly
the methods registered here, check their inputs with :func:`check` and build
the model with :func:`upcycle`; a new method is one :func:`register_method`
call.

Every method but BAM can add a shared expert and name the Hugging Face
architecture the model exports as (``target``: ``mixtral``, ``qwen2_moe``,
``qwen3_moe``; see :mod:`moe_jax.upcycle.targets`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from moe_jax.upcycle.bam import bam_merge
from moe_jax.upcycle.btx import btx_merge
from moe_jax.upcycle.common import upcycled_moe_config
from moe_jax.upcycle.sparse import sparse_upcycle
from moe_jax.upcycle.targets import add_shared_expert, check_target, retarget


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
  """An upcycling method.

  Attributes:
    name: what ``--method`` / ``method=`` take.
    label: the method's name in messages (``"BAM"``).
    build: ``(configs, params, *, num_experts, moe, moe_layout, seed, names,
      **options) -> (config, params)``.
    branches: ``True``: one dense model per expert (at least two);
      ``False``: exactly one model, copied into ``num_experts`` experts.
    default_top_k: FFN experts per token when not given (at most E).
    options: the keyword options only this method takes.
    attention_experts: it makes attention experts (no shared expert, no
      transformers architecture to export as).
  """

  name: str
  label: str
  build: Callable[..., tuple[Any, dict]]
  branches: bool
  default_top_k: int = 2
  options: tuple[str, ...] = ()
  attention_experts: bool = False


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> None:
  """Adds ``method`` (a name already registered with another method is an error)."""
  if METHODS.get(method.name, method) != method:
    raise ValueError(f"upcycling method {method.name!r} is already registered")
  METHODS[method.name] = method


def _names() -> str:
  quoted = [repr(n) for n in METHODS]
  return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def get_method(name: str, owner: str = "upcycle") -> Method:
  """The method called ``name``; ``ValueError`` naming the known ones otherwise."""
  if name not in METHODS:
    raise ValueError(f"{owner}: method must be {_names()}, got {name!r}")
  return METHODS[name]


def _check_count(value: Any, what: str, owner: str) -> None:
  """``None`` (the default) or a positive int: 0 experts or top-0 is an error, not a default."""
  if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
    raise ValueError(f"{owner}: {what} must be a positive integer, got {value!r}")


def check(name: str, num_inputs: int, *, num_experts: int | None = None,
          options: Mapping[str, Any] | None = None, owner: str = "upcycle") -> Method:
  """Checks the inputs of method ``name`` before anything is loaded; returns the method.

  Raises:
    ValueError: unknown method, wrong number of dense models, missing or
      inconsistent ``num_experts``, or an option of another method.
  """
  method = get_method(name, owner)
  _check_count(num_experts, "num_experts", owner)
  if not method.branches and num_inputs != 1:
    raise ValueError(f"{owner}: method {name!r} takes exactly one checkpoint (dense model), "
                     f"got {num_inputs}")
  if method.branches and num_inputs < 2:
    raise ValueError(f"{owner}: method {name!r} mixes several dense models (one per expert); "
                     f"got {num_inputs}")
  if not method.branches and num_experts is None:
    raise ValueError(f"{owner}: method {name!r} needs num_experts")
  if method.branches and num_experts not in (None, num_inputs):
    raise ValueError(f"{owner}: method {name!r} has one expert per dense model; "
                     f"num_experts={num_experts} but {num_inputs} models")
  for option in options or {}:
    if option not in method.options:
      owners = [m for m in METHODS.values() if option in m.options]
      where = "; ".join(f"{m.label} options (method {m.name!r}): {', '.join(m.options)}"
                        for m in owners) or "no method takes it"
      raise ValueError(f"{owner}: method {name!r} has no option {option!r}; {where}")
  return method


def upcycle(name: str, configs: Sequence[Any], params: Sequence[Mapping], *,
            num_experts: int | None = None, top_k: int | None = None,
            capacity_factor: float | None = None, renormalize: bool = True,
            moe_layout: str | Sequence[int] = "every", seed: int = 0,
            names: Sequence[str] | None = None, owner: str = "upcycle",
            target: str | None = None, shared_expert: bool | None = None,
            shared_expert_scale: float | None = None, shared_expert_gate: bool = True,
            **options: Any) -> tuple[Any, dict]:
  """Dense model(s) -> ``(config, params)`` of the upcycled model, with method ``name``.

  Args:
    name: a registered method (``"sparse"``, ``"btx"``, ``"bam"``).
    configs, params: the dense models (one for ``sparse``).
    num_experts: E (``sparse``: required; otherwise the number of models).
    top_k: FFN experts per token (default the method's, at most E).
    capacity_factor, renormalize: of
      :func:`~moe_jax.upcycle.common.upcycled_moe_config`.
    moe_layout: ``"every"``, ``"every_other"`` or layer indices.
    seed: routers (and the sparse copies' noise).
    names: the inputs' names for error messages.
    owner: who is asking, for error messages.
    target: the transformers architecture ``export_hf`` writes: ``"mixtral"``,
      ``"qwen2_moe"`` or ``"qwen3_moe"`` (``None``: Mixtral, as before); checked
      here, before anything is written.
    shared_expert: add a shared expert from the dense FFN to every MoE layer
      (default: iff ``target="qwen2_moe"``).
    shared_expert_scale, shared_expert_gate: its down-projection scale
      (mergekit-moe's ``residual_scale``) and Qwen2-MoE's sigmoid gate; see
      :mod:`moe_jax.upcycle.targets` (the layer stays function-preserving).
    **options: the method's own options (``noise_std``; ``shared_kv``,
      ``attention_top_k``).
  """
  method = check(name, len(configs), num_experts=num_experts, options=options, owner=owner)
  _check_count(top_k, "top_k", owner)
  shared = check_target(target, shared_expert, label=method.label, name=name,
                        attention_experts=method.attention_experts, owner=owner)
  if not shared and (shared_expert_scale is not None or not shared_expert_gate):
    raise ValueError(f"{owner}: shared_expert_scale / shared_expert_gate need a shared expert "
                     "(shared_expert=True or target='qwen2_moe')")
  e = len(configs) if num_experts is None else num_experts
  moe = upcycled_moe_config(e, min(method.default_top_k, e) if top_k is None else top_k,
                            capacity_factor=capacity_factor, renormalize=renormalize)
  config, out = method.build(list(configs), list(params), num_experts=e, moe=moe,
                             moe_layout=moe_layout, seed=seed, names=names, **options)
  if shared:
    config, out = add_shared_expert(config, out, params, gate=shared_expert_gate,
                                    scale=shared_expert_scale, owner=owner)
  if target is not None:
    config = retarget(config, target, label=method.label, owner=owner)
  return config, out


def _sparse(configs, params, *, num_experts, names, **kwargs):
  del names  # one input: its errors need no name
  return sparse_upcycle(configs[0], params[0], num_experts=num_experts, **kwargs)


def _branches(merge):
  def build(configs, params, *, num_experts, **kwargs):
    del num_experts  # one expert per branch, checked by check()
    return merge(configs, params, **kwargs)
  return build


register_method(Method(name="sparse", label="sparse upcycling", build=_sparse, branches=False,
                       default_top_k=2, options=("noise_std",)))
register_method(Method(name="btx", label="BTX", build=_branches(btx_merge), branches=True,
                       default_top_k=2))
register_method(Method(name="bam", label="BAM", build=_branches(bam_merge), branches=True,
                       default_top_k=1, options=("shared_kv", "attention_top_k"),
                       attention_experts=True))
