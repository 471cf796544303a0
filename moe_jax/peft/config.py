"""What to adapt and how: :class:`PeftConfig`, the one config of the PEFT methods.

Four methods share one config (Zadouri et al. 2023, arXiv 2309.05444):

=========  ===========================================  ==========================
method     per site                                     default sites
=========  ===========================================  ==========================
``ia3``    a learned vector scaling the output          ``k``, ``v``, ``ffn``
``lora``   ``y += (alpha / R) · x A B``                 ``q``, ``v``
``mov``    E (IA)^3 vectors, merged by a router         ``k``, ``v``, ``ffn``
``molora`` E LoRA experts, merged by a router           ``q``, ``v``
=========  ===========================================  ==========================

The methods are a registry (:class:`Method`, :func:`register_method`).

Sites name *where* an adapter sits, in every block of every model family.
``q``/``k``/``v``/``o`` are the projections of every attention module (T5's
decoder: self- and cross-attention; a BAM mixture of attention: the adapter
is shared by the attention experts; a CALM composition layer's
cross-attention); ``ffn`` is the activated intermediate of every dense FFN
``[B, L, F]`` (scaling sites only: for a gated FFN ``act(gate) * up`` is
scaled, which is the same as scaling the gated branch); ``ffn_in`` is every
FFN input projection (``wi``, or ``wi_0`` and ``wi_1``) and ``ffn_out`` the
output projection ``wo`` (LoRA sites only). Scaling sites ``q``/``k``/``v``
scale the projection output before RoPE, so they fold exactly into the
kernels. The defaults are the (IA)^3 paper's and Hugging Face ``peft``'s.
The ``ffn`` sites adapt dense FFNs (a shared expert and the dense layers of
an ``every_other`` layout included), not the routed experts of an MoE FFN.

The ``expert_*`` sites adapt the routed experts' stacked kernels, one adapter
*per expert*: ``expert_ffn`` scales each expert's hidden (``scale [E, F]``,
(IA)^3 / MoV), ``expert_in`` / ``expert_out`` add a per-expert LoRA to the
input kernels (``wi`` or ``wi_0`` and ``wi_1``) / the output kernel ``wo``
(``lora_a [E, D, R]``, ``lora_b [E, R, F]``). They adapt the kernels
themselves (``W_e + (alpha / R) A_e B_e``, ``wo_e`` rows times ``s_e``), so
every dispatch path (padded, sorted, ragged, expert parallel) runs them
unchanged. The MoE router already picks an expert, hence its adapter, per
token, so a mixture method (``mov`` / ``molora``) on these sites must have
``num_experts=1`` (a second router inside each expert would need the
token's merge weights inside every dispatch path).

Routers (mixtures only) are described in :mod:`moe_jax.peft.routers`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

ATTENTION_SITES = ("q", "k", "v", "o")
SCALE_SITES = ("q", "k", "v", "ffn", "expert_ffn")
LORA_SITES = ("q", "k", "v", "o", "ffn_in", "ffn_out", "expert_in", "expert_out")
EXPERT_SITES = ("expert_ffn", "expert_in", "expert_out")
ROUTERS = ("token", "sentence")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
  """One PEFT method: its entry in the registry that :class:`PeftConfig` and the adapters read.

  Adding a method is one :func:`register_method` call plus, when its math is
  new, an adapter family in :data:`moe_jax.peft.adapters.ADAPTERS`.

  Attributes:
    name: what ``PeftConfig.method`` says.
    adapter: the adapter family (a key of ``moe_jax.peft.adapters.ADAPTERS``):
      ``"scale"`` multiplies the tensor at its site, ``"lora"`` adds a
      low-rank update computed from the projection's input.
    sites: where it may sit (canonical order).
    default_sites: where it sits when ``PeftConfig.sites`` is ``None``.
    mixture: E experts merged per token by a router (``num_experts`` may exceed 1).
  """

  name: str
  adapter: str
  sites: tuple[str, ...]
  default_sites: tuple[str, ...]
  mixture: bool = False


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
  """Adds ``method`` to the registry (registering the same entry twice is a no-op)."""
  if method.name in _REGISTRY and _REGISTRY[method.name] != method:
    raise ValueError(f"PEFT method {method.name!r} is already registered as "
                     f"{_REGISTRY[method.name]}")
  unknown = [s for s in method.sites if s not in LORA_SITES + SCALE_SITES]
  if unknown or not set(method.default_sites) <= set(method.sites):
    known = tuple(dict.fromkeys(LORA_SITES + SCALE_SITES))
    raise ValueError(f"{method}: sites must be among {known} and include the default sites")
  _REGISTRY[method.name] = method
  return method


def method_spec(name: str) -> Method:
  """The registry entry of ``name``."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f"PeftConfig.method={name!r} is not one of {tuple(_REGISTRY)}") from None


for _m in (Method(name="ia3", adapter="scale", sites=SCALE_SITES, default_sites=("k", "v", "ffn")),
           Method(name="lora", adapter="lora", sites=LORA_SITES, default_sites=("q", "v")),
           Method(name="mov", adapter="scale", sites=SCALE_SITES, default_sites=("k", "v", "ffn"),
                  mixture=True),
           Method(name="molora", adapter="lora", sites=LORA_SITES, default_sites=("q", "v"),
                  mixture=True)):
  register_method(_m)

#: The built-in methods (:func:`register_method` may add more).
METHODS = tuple(_REGISTRY)
DEFAULT_SITES = {name: m.default_sites for name, m in _REGISTRY.items()}

#: Every adapter or router parameter lives under a module whose name starts
#: with this prefix (``layers_0/attn/peft_k/scale``); backbone names never do.
#: :func:`moe_jax.peft.trainable_mask` relies on it.
ADAPTER_PREFIX = "peft_"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeftConfig:
  """Which adapters go where, and how mixtures route.

  Attributes:
    method: ``"ia3"``, ``"lora"``, ``"mov"`` or ``"molora"``.
    sites: where adapters sit (see the module docstring); ``None`` means the
      method's default. Stored sorted in canonical order.
    num_experts: E for ``mov``/``molora`` (1 reproduces ``ia3``/``lora``
      exactly); must be 1 for ``ia3``/``lora``.
    rank: LoRA rank R (per expert for ``molora``).
    alpha: LoRA scaling numerator; updates are multiplied by ``alpha / rank``.
    router: ``"token"`` (each token routes on its own representation, the
      paper's default) or ``"sentence"`` (on the mean of the representations
      of the tokens it may attend to; see :mod:`moe_jax.peft.routers`).
    top_k: keep only the k most probable experts per token (``None``: soft
      merging of all E, the paper's default).
    renormalize: with ``top_k``, rescale the kept probabilities to sum to 1.
    load_balance_coef: weight of the Switch load-balancing loss sown in the
      ``aux_loss`` collection (0: reported as a metric only).
    z_loss_coef: weight of the router z-loss (ST-MoE), likewise.
  """

  method: str
  sites: tuple[str, ...] | None = None
  num_experts: int = 1
  rank: int = 4
  alpha: float = 8.0
  router: str = "token"
  top_k: int | None = None
  renormalize: bool = True
  load_balance_coef: float = 0.0
  z_loss_coef: float = 0.0

  def __post_init__(self):
    spec = method_spec(self.method)
    sites = spec.default_sites if self.sites is None else self.sites
    if isinstance(sites, str):
      raise ValueError(f"PeftConfig.sites must be a tuple of site names, got the string "
                       f"{sites!r}")
    allowed = spec.sites
    bad = [s for s in sites if s not in allowed]
    if bad:
      raise ValueError(f"PeftConfig.sites {bad} are not {self.method} sites; "
                       f"{self.method} adapts {allowed}")
    if not sites:
      raise ValueError("PeftConfig.sites is empty: nothing would be adapted")
    if len(set(sites)) != len(sites):
      raise ValueError(f"PeftConfig.sites repeats a site: {tuple(sites)}")
    object.__setattr__(self, "sites", tuple(s for s in allowed if s in sites))
    if self.num_experts < 1:
      raise ValueError(f"PeftConfig.num_experts must be >= 1, got {self.num_experts}")
    experts = [s for s in self.sites if s in EXPERT_SITES]
    if experts and self.num_experts > 1:
      raise ValueError(f"PeftConfig.sites {experts}: the routed experts get one adapter each, "
                       f"picked by the MoE router, so a mixture of {self.num_experts} adapters "
                       "cannot sit there; use num_experts=1 (or lora / ia3)")
    mixtures = tuple(name for name, m in _REGISTRY.items() if m.mixture)
    if not spec.mixture and self.num_experts != 1:
      raise ValueError(f"PeftConfig.num_experts={self.num_experts} needs a mixture method "
                       f"({' or '.join(mixtures)}); {self.method} has one adapter per site")
    if not spec.mixture:
      routed = {name: getattr(self, name) for name, default in (
          ("router", "token"), ("top_k", None), ("load_balance_coef", 0.0),
          ("z_loss_coef", 0.0)) if getattr(self, name) != default}
      if routed:
        raise ValueError(f"PeftConfig: {self.method} has no router, so {routed} would be "
                         f"ignored; use {' / '.join(mixtures)} for routed mixtures")
    if self.rank < 1:
      raise ValueError(f"PeftConfig.rank must be >= 1, got {self.rank}")
    if self.router not in ROUTERS:
      raise ValueError(f"PeftConfig.router={self.router!r} is not one of {ROUTERS}")
    if self.top_k is not None and not 1 <= self.top_k <= self.num_experts:
      raise ValueError(f"PeftConfig.top_k={self.top_k} must be in [1, num_experts="
                       f"{self.num_experts}] or None (soft merging)")
    for name in ("load_balance_coef", "z_loss_coef"):
      if getattr(self, name) < 0:
        raise ValueError(f"PeftConfig.{name} must be >= 0, got {getattr(self, name)}")

  @property
  def spec(self) -> Method:
    """The method's registry entry."""
    return method_spec(self.method)

  @property
  def is_mixture(self) -> bool:
    return self.spec.mixture

  @property
  def is_lora(self) -> bool:
    return self.spec.adapter == "lora"

  @property
  def scaling(self) -> float:
    """LoRA's ``alpha / rank``."""
    return self.alpha / self.rank

  @property
  def foldable(self) -> bool:
    """Whether the adapters fold into the base weights (single expert, input-independent)."""
    return self.num_experts == 1

  def attention_sites(self) -> tuple[str, ...]:
    return tuple(s for s in self.sites if s in ATTENTION_SITES)

  def replace(self, **kw) -> "PeftConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["sites"] = list(self.sites)
    return d

  @classmethod
  def from_dict(cls, data: Mapping[str, Any], source: str = "peft config") -> "PeftConfig":
    if not isinstance(data, Mapping):
      raise ValueError(f"{source}: expected an object, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
      raise ValueError(f"{source}: unknown PeftConfig field(s) {unknown}")
    kw = dict(data)
    if kw.get("sites") is not None:
      kw["sites"] = tuple(kw["sites"])
    try:
      return cls(**kw)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{source}: {e}") from None
