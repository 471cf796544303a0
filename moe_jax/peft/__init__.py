"""Parameter-efficient MoE on frozen backbones: (IA)^3, LoRA, MoV and MoLoRA.

Zadouri et al. 2023 ("Pushing Mixture of Experts to the Limit", arXiv
2309.05444). Typical use::

    from moe_jax import peft
    from moe_jax.checkpoints import load_hf

    base = load_hf("path/to/llama")
    cfg = peft.PeftConfig(method="mov", num_experts=10)
    model = peft.adapt(base, cfg)                       # same backbone parameter names
    params = peft.init_adapter_params(model, base.params, jax.random.key(0))
    mask = peft.trainable_mask(params)                  # adapters + routers only
    tx = peft.masked_optimizer(optax.adamw(3e-3), mask) # no state for the backbone
    logits, state = model.apply({"params": params}, tokens,
                                mutable=[peft.AUX_LOSS_COLLECTION, peft.METRICS_COLLECTION])
    loss = ce(logits) + peft.total_aux_loss(state)
    ...
    peft.save_adapters("out/mov", params, cfg, base_checkpoint="path/to/llama")
    peft.merge_and_export_hf("out/hf", base.config, params, cfg)   # ia3 / lora only
    peft.export_peft("out/peft", base.config, params, cfg)          # HF peft / vLLM LoRA dir

Any registered model family adapts the same way: dense, MoE (sparse-upcycled,
Mixtral) and BAM decoders, T5, CALM compositions.

Modules: :mod:`config` (:class:`PeftConfig`, the method registry),
:mod:`routers` (routing math, losses, metrics), :mod:`adapters` (adapter math
and parameters, the adapter families), :mod:`layers` (:func:`adapt`: adapters
attached by interception of the backbone's projections, the site registry),
:mod:`params` (initialisation, freezing, optimizer), :mod:`export`
(folding, HF export, adapter files), :mod:`hf_peft` (Hugging Face ``peft`` adapter
directories), :mod:`training` (:func:`adapted_model`
for gin-configured runs), :mod:`sweep` and :mod:`analysis` (the PEFT sweep:
rank classification, routing statistics).
"""

from moe_jax.peft.adapters import ADAPTERS, AdapterFamily, Projection
from moe_jax.peft.config import (ADAPTER_PREFIX, DEFAULT_SITES, LORA_SITES, METHODS,
                                 SCALE_SITES, Method, PeftConfig, method_spec, register_method)
from moe_jax.peft.export import (SavedAdapters, fold_adapters, load_adapted, load_adapters,
                                 merge_and_export_hf, save_adapters)
from moe_jax.peft.hf_peft import export_peft
from moe_jax.peft.layers import SITES, Site, adapt, peft_config_of, register_sublayer
from moe_jax.peft.params import (apply_masked_updates, init_adapter_params, logical_axes,
                                 masked_optimizer, merge_params, param_shapes,
                                 parameter_report, split_params, trainable_mask)
from moe_jax.peft.routers import (AUX_LOSS_COLLECTION, METRICS_COLLECTION, RouteContext,
                                  summarize_metrics, total_aux_loss)
from moe_jax.peft.training import adapted_model

__all__ = [
    "ADAPTERS", "ADAPTER_PREFIX", "AUX_LOSS_COLLECTION", "AdapterFamily", "DEFAULT_SITES",
    "LORA_SITES", "METHODS", "METRICS_COLLECTION", "Method", "PeftConfig", "Projection",
    "RouteContext", "SCALE_SITES", "SITES", "SavedAdapters", "Site", "adapt",
    "apply_masked_updates", "export_peft", "fold_adapters", "init_adapter_params", "load_adapted",
    "load_adapters", "logical_axes", "masked_optimizer", "merge_and_export_hf", "merge_params",
    "method_spec", "param_shapes", "parameter_report", "peft_config_of", "register_method",
    "register_sublayer", "save_adapters", "split_params", "summarize_metrics", "total_aux_loss",
    "trainable_mask", "adapted_model",
]
