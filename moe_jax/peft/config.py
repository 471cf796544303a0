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

Sites name *where* in every block an adapter sits. ``q``/``k``/``v``/``o``
are the attention projections of every attention module (T5's decoder:
self- and cross-attention); ``ffn`` is the activated FFN intermediate
``[B, L, F]`` (scaling sites only: for a gated FFN ``act(gate) * up`` is
scaled, which is the same as scaling the gated branch); ``ffn_in`` is every
FFN input projection (``wi``, or ``wi_0`` and ``wi_1``) and ``ffn_out`` the
output projection ``wo`` (LoRA sites only). Scaling sites ``q``/``k``/``v``
scale the projection output before RoPE, so they fold exactly into the
kernels. The defaults are the (IA)^3 paper's and Hugging Face ``peft``'s.

Routers (mixtures only) are described in :mod:`moe_jax.peft.routers`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

METHODS = ("ia3", "lora", "mov", "molora")
SCALE_METHODS = ("ia3", "mov")
LORA_METHODS = ("lora", "molora")
MIXTURE_METHODS = ("mov", "molora")
ROUTERS = ("token", "sentence")

ATTENTION_SITES = ("q", "k", "v", "o")
SCALE_SITES = ("q", "k", "v", "ffn")
LORA_SITES = ("q", "k", "v", "o", "ffn_in", "ffn_out")
DEFAULT_SITES = {"ia3": ("k", "v", "ffn"), "mov": ("k", "v", "ffn"),
                 "lora": ("q", "v"), "molora": ("q", "v")}

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
    if self.method not in METHODS:
      raise ValueError(f"PeftConfig.method={self.method!r} is not one of {METHODS}")
    sites = DEFAULT_SITES[self.method] if self.sites is None else self.sites
    if isinstance(sites, str):
      raise ValueError(f"PeftConfig.sites must be a tuple of site names, got the string "
                       f"{sites!r}")
    allowed = SCALE_SITES if self.method in SCALE_METHODS else LORA_SITES
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
    if self.method not in MIXTURE_METHODS and self.num_experts != 1:
      raise ValueError(f"PeftConfig.num_experts={self.num_experts} needs a mixture method "
                       f"(mov or molora); {self.method} has one adapter per site")
    if self.method not in MIXTURE_METHODS:
      routed = {name: getattr(self, name) for name, default in (
          ("router", "token"), ("top_k", None), ("load_balance_coef", 0.0),
          ("z_loss_coef", 0.0)) if getattr(self, name) != default}
      if routed:
        raise ValueError(f"PeftConfig: {self.method} has no router, so {routed} would be "
                         "ignored; use mov / molora for routed mixtures")
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
  def is_mixture(self) -> bool:
    return self.method in MIXTURE_METHODS

  @property
  def is_lora(self) -> bool:
    return self.method in LORA_METHODS

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
