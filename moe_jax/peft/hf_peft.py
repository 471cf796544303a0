"""Adapters as Hugging Face ``peft`` adapter directories, the format servers read.

:func:`export_peft` writes ``adapter_config.json`` + ``adapter_model.safetensors``
that ``peft.PeftModel.from_pretrained(base, path)`` loads onto the Hugging Face
base (the one :func:`moe_jax.checkpoints.export_hf` writes) and that vLLM's
multi-LoRA loader reads (same file names, tensor names and config fields).

=======================  ==============================================================
ours                     ``peft``
=======================  ==============================================================
``lora``                 ``LORA``: ``lora_A.weight [R, in]``, ``lora_B.weight [out, R]``,
                         ``lora_alpha / r`` = our ``alpha / rank``
``ia3``                  ``IA3``: ``ia3_l [out, 1]`` (``q``/``k``/``v``: the projection
                         output, bias included, as ours); ``ia3_l [1, F]`` on
                         ``down_proj`` / ``wo`` listed in ``feedforward_modules`` (``ffn``:
                         the hidden before the output projection, as ours)
``mov`` / ``molora``     with one expert: as ``ia3`` / ``lora`` (the router weight is
                         exactly 1); with E > 1: no equivalent (the router picks a
                         different merge per token), a ``ValueError`` that points to
                         :func:`~moe_jax.peft.save_adapters`
expert sites             no equivalent (``peft``'s LoRA targets ``nn.Linear`` modules,
                         not the stacked expert weights): a ``ValueError`` that points
                         to :func:`~moe_jax.peft.merge_and_export_hf`, which folds them
                         exactly
=======================  ==============================================================

**Module names come from the checkpoint converters**, not from a second
table: the converter's own ``params_to_hf`` (the one ``export_hf`` runs) is
applied once to a *probe* tree, every leaf a zero-stride view of a ``uint8``
zero except the adapted kernels, each a view of its own marker value; the HF
tensor (and its rows) where a marker lands is the module the adapter targets
(``q`` -> ``model.layers.0.self_attn.q_proj``, T5's ``q`` ->
``encoder.block.0.layer.0.SelfAttention.q``). The probe costs one byte per
backbone parameter, transiently. Converters flatten our kernels
``[I..., K...]`` into ``[out, in]`` row-major on both sides, which the
factors follow (``A [I..., R] -> lora_A [R, prod(I)]``).

**Fused HF modules** (Phi-3's ``qkv_proj`` / ``gate_up_proj``) are exported
exactly: the LoRAs of their adapted parts become one LoRA of rank
``n · R`` (``A`` stacked, ``B`` block-diagonal with zero rows for the parts
without an adapter), listed in ``rank_pattern`` / ``alpha_pattern`` with
``alpha · n`` so that ``alpha / r`` is unchanged; (IA)^3 vectors are ones on
the rows of the unadapted parts. ``peft`` loads these; servers that ignore
``rank_pattern`` (vLLM at the time of writing) need unfused targets.

``target_modules`` lists the short names (``["q_proj", "v_proj"]``, what
vLLM expects) when every module of that name is adapted, which is what our
sites do (every layer), else the full module names.

**MoE models with fused experts** (transformers 5: ``mlp.experts.gate_up_proj``
/ ``down_proj`` as stacked parameters): on loading, ``peft`` (seen in 0.21) rewrites
every ``target_modules`` entry named like a pre-fusion expert projection
(``gate_proj`` / ``up_proj`` / ``down_proj``, Mixtral's ``w1`` / ``w2`` /
``w3``, the router ``gate``), short *or* full name, into
``target_parameters=["gate_up_proj", ...]`` on the experts, so LoRA meant for
the dense FFN or the shared experts would land on the routed experts (and its
tensors go missing). For those model types such modules are listed in
``target_parameters`` by their full weight names instead
(``model.layers.0.mlp.gate_proj.weight``), which ``peft`` leaves as they are
and applies to exactly that ``nn.Linear`` weight (the same ``W + s · B A``, same
tensor names). Readers without ``target_parameters`` (peft < 0.17) do not load these.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from moe_jax.checkpoints import unbox
from moe_jax.checkpoints.io import atomic_directory, write_json, write_safetensors
from moe_jax.peft.config import ADAPTER_PREFIX, PeftConfig
from moe_jax.peft.params import split_params

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_STEM = "adapter_model"
_KEY_PREFIX = "base_model.model."
# HF model types whose experts transformers 5 fuses and whose LoRA target_modules peft 0.21
# rewrites onto them by name (peft.utils.transformers_weight_conversion), and the names it
# rewrites. (qwen2_moe itself is not rewritten there: its full-name targets load as they are.)
_FUSED_EXPERT_TYPES = frozenset({"mixtral", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"})
_EXPERT_NAMES = frozenset({"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "gate"})


# ----------------------------------------------------------------------------- our adapters


def _single_expert(adapter: Mapping, where: str, peft: PeftConfig) -> dict:
  """The adapter of a one-expert mixture without its expert axis; E > 1 raises."""
  router = adapter.get("router")
  arrays = {k: np.asarray(v, np.float32) for k, v in adapter.items() if k != "router"}
  if router is None:
    return arrays
  e = np.shape(router["kernel"])[-1]
  if e != 1:
    raise ValueError(
        f"{where}: a {peft.method} mixture of {e} experts has no Hugging Face peft equivalent "
        "(its router merges the experts differently for every token); save it with "
        "moe_jax.peft.save_adapters and load it with moe_jax.peft.load_adapted (with "
        "num_experts=1 it exports here, or folds with moe_jax.peft.merge_and_export_hf)")
  if "scale" in arrays:
    return {"scale": arrays["scale"][0]}
  return {"lora_a": arrays["lora_a"][..., 0, :], "lora_b": arrays["lora_b"][0]}


def _stacked(adapter: Mapping, site: str, kernel_ndim: int) -> bool:
  """Whether the adapted kernel has an expert axis beyond the adapter's ``[I..., K...]``."""
  if "lora_a" in adapter:  # A [I..., R], B [R, K...]; per-expert A [E, I..., R], B [E, R, K...]
    return kernel_ndim != adapter["lora_a"].ndim + adapter["lora_b"].ndim - 2
  if site == "hidden":  # the FFN hidden: wo [F, D]
    return kernel_ndim != 2
  return kernel_ndim != adapter["scale"].ndim + 1  # q / k / v: [D, K...]


def _targets(node: Mapping, peft: PeftConfig, where: str, out: list) -> list:
  """``(kernel path, adapter, kind)`` of every adapter under ``node`` (unrolled params).

  ``kind``: ``"lora"``, ``"scale_out"`` (scales the projection output) or
  ``"scale_in"`` (scales the FFN hidden, the input of ``wo``).
  """
  for key, value in node.items():
    name = f"{where}/{key}" if where else str(key)
    if not str(key).startswith(ADAPTER_PREFIX):
      if isinstance(value, Mapping):
        _targets(value, peft, name, out)
      continue
    site = str(key)[len(ADAPTER_PREFIX):]
    adapter = _single_expert(value, name, peft)
    target = "wo" if site == "hidden" else site
    if _stacked(adapter, site, np.ndim(node[target]["kernel"])):
      raise ValueError(
          f"{name}: adapters on stacked expert weights (routed experts, attention experts) have "
          "no Hugging Face peft equivalent (peft's adapters target nn.Linear modules); fold "
          "them with moe_jax.peft.merge_and_export_hf (exact) or keep them with "
          "moe_jax.peft.save_adapters")
    kind = "lora" if "lora_a" in adapter else ("scale_in" if site == "hidden" else "scale_out")
    out.append((f"{where}/{target}" if where else target, adapter, kind))
  return out


# ----------------------------------------------------------------------------- module names


def _probe_tree(shapes: Mapping, prefix: str, markers: Mapping[str, int]) -> dict:
  out = {}
  for key, value in shapes.items():
    name = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      out[key] = _probe_tree(value, name, markers)
    else:
      out[key] = np.broadcast_to(np.uint8(markers.get(name, 0)), np.shape(value))
  return out


def _locate(conv: Any, config: Any, params: Mapping, kernels: list[str]
            ) -> tuple[dict[str, tuple[str, int, int, tuple[int, int]]], set[str]]:
  """Where each kernel lands in the converter's HF export.

  Returns:
    ``{kernel path: (HF module, first row, rows, HF weight shape)}`` and the
    names of every 2-D HF tensor's module (for the short-name check).
  """
  found: dict[str, tuple[str, int, int, tuple[int, int]]] = {}
  modules: set[str] = set()
  for start in range(0, len(kernels), 255):  # uint8 markers 1..255 per pass
    group = kernels[start:start + 255]
    markers = {f"{path}/kernel": i + 1 for i, path in enumerate(group)}
    tensors = conv.params_to_hf(_probe_tree(params, "", markers), config)
    for hf_name, w in tensors.items():
      w = np.asarray(w)
      if w.ndim == 2 and hf_name.endswith(".weight"):
        modules.add(hf_name[:-len(".weight")])
      if not w.any():
        continue
      for m in np.unique(w[w != 0]):
        path = group[int(m) - 1]
        hit = w == m
        rows = np.flatnonzero(hit.any(axis=1))
        if (w.ndim != 2 or not hf_name.endswith(".weight") or path in found
            or not hit[rows].all() or rows[-1] - rows[0] + 1 != rows.size):
          raise ValueError(f"{path}: its Hugging Face tensor layout ({hf_name}, shape "
                           f"{w.shape}) is not one Linear module's rows; this adapter has "
                           "no peft form here (use moe_jax.peft.merge_and_export_hf)")
        found[path] = (hf_name[:-len(".weight")], int(rows[0]), int(rows.size), w.shape)
  missing = [p for p in kernels if p not in found]
  if missing:
    raise ValueError(f"{missing[0]}: not written by the Hugging Face export of "
                     f"{type(config).__name__}, so no peft module can carry its adapter")
  return found, modules


def _names(adapted: list[str], modules: set[str]) -> list[str]:
  """Short names when they select exactly ``adapted``, else the full module names."""
  short = sorted({m.rsplit(".", 1)[-1] for m in adapted})
  selected = {m for m in modules if m.rsplit(".", 1)[-1] in short}
  return short if selected == set(adapted) else sorted(adapted)


def _split_parameters(names: list[str], adapted: list[str], modules: set[str],
                      hf_config: Mapping, patterns: Mapping[str, int]
                      ) -> tuple[list[str], list[str] | None]:
  """``(target_modules, target_parameters)``: on fused-expert MoE types, the modules peft
  would rewrite onto the experts move to ``target_parameters`` by full weight name."""
  if hf_config.get("model_type") not in _FUSED_EXPERT_TYPES:
    return names, None
  moved = [m for m in adapted if m.rsplit(".", 1)[-1] in _EXPERT_NAMES]
  if not moved:
    return names, None
  for m in moved:
    if m in patterns:
      raise ValueError(f"{m}: a LoRA on part of this fused module has no peft form on "
                       f"{hf_config.get('model_type')} (peft retargets it onto the fused experts; "
                       "as a target parameter it cannot carry a rank pattern); fold it with "
                       "moe_jax.peft.merge_and_export_hf")
  kept = [m for m in adapted if m not in moved]
  return _names(kept, modules) if kept else [], [m + ".weight" for m in moved]


# ----------------------------------------------------------------------------- tensors


def _lora_tensors(module: str, parts: list, rank: int, out_rows: int, in_features: int
                  ) -> dict[str, np.ndarray]:
  n = len(parts)
  a_hf = np.zeros((n * rank, in_features), np.float32)
  b_hf = np.zeros((out_rows, n * rank), np.float32)
  for j, (row0, rows, adapter) in enumerate(parts):
    a = adapter["lora_a"].reshape(-1, rank)
    b = adapter["lora_b"].reshape(rank, -1)
    if a.shape[0] != in_features or b.shape[1] != rows:
      raise ValueError(f"{module}: LoRA {a.shape} x {b.shape} does not fit the HF weight rows "
                       f"{row0}:{row0 + rows} of in_features {in_features}")
    a_hf[j * rank:(j + 1) * rank] = a.T
    b_hf[row0:row0 + rows, j * rank:(j + 1) * rank] = b.T
  key = _KEY_PREFIX + module
  return {key + ".lora_A.weight": a_hf, key + ".lora_B.weight": b_hf}


def _ia3_tensor(module: str, parts: list, out_rows: int, in_features: int
                ) -> tuple[dict[str, np.ndarray], bool]:
  kinds = {kind for _, _, (_, kind) in parts}
  if kinds == {"scale_in"}:
    (row0, rows, (adapter, _)), = parts
    if rows != out_rows:
      raise ValueError(f"{module}: an (IA)^3 input scaling on part of a fused module has no "
                       "peft form")
    return {_KEY_PREFIX + module + ".ia3_l": adapter["scale"].reshape(1, in_features)}, True
  if kinds != {"scale_out"}:
    raise ValueError(f"{module}: (IA)^3 both on the input and the output of one module has no "
                     "peft form")
  ia3 = np.ones((out_rows, 1), np.float32)
  for row0, rows, (adapter, _) in parts:
    ia3[row0:row0 + rows, 0] = adapter["scale"].reshape(-1)
  return {_KEY_PREFIX + module + ".ia3_l": ia3}, False


# ----------------------------------------------------------------------------- export


def _peft_config(peft: PeftConfig, hf_config: Mapping, base: str | None, targets: list[str],
                 feedforward: list[str], patterns: dict[str, int],
                 parameters: list[str] | None = None) -> dict[str, Any]:
  arch = (hf_config.get("architectures") or [""])[0]
  common = {"base_model_name_or_path": base, "revision": None, "inference_mode": True,
            "task_type": "SEQ_2_SEQ_LM" if "ConditionalGeneration" in arch else "CAUSAL_LM",
            "target_modules": targets, "modules_to_save": None, "fan_in_fan_out": False,
            "exclude_modules": None, "auto_mapping": None}
  if not peft.is_lora:
    return {"peft_type": "IA3", **common, "feedforward_modules": feedforward,
            "init_ia3_weights": True}
  if parameters:
    common["target_parameters"] = parameters
  return {"peft_type": "LORA", **common, "r": peft.rank, "lora_alpha": peft.alpha,
          "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
          "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
          "rank_pattern": {m: peft.rank * n for m, n in patterns.items()},
          "alpha_pattern": {m: peft.alpha * n for m, n in patterns.items()}}


def export_peft(path: str | os.PathLike, config: Any, params: Mapping, peft: PeftConfig, *,
                base_model_name_or_path: str | None = None, dtype: str = "float32") -> Path:
  """Writes the adapters of ``params`` as a Hugging Face ``peft`` adapter directory.

  Args:
    path: target directory (written atomically): ``adapter_config.json`` and
      ``adapter_model.safetensors``.
    config: the backbone config (``LoadedModel.config``); its HF export
      (:func:`moe_jax.checkpoints.export_hf`) is the base the adapter loads onto.
    params: the adapted model's parameters (unrolled or scanned).
    peft: the adapters' config.
    base_model_name_or_path: recorded in ``adapter_config.json`` (where the
      HF base lives: a directory or hub id).
    dtype: tensor dtype in the file (``float32``, ``bfloat16``, ``float16``).

  Raises:
    ValueError: adapters with no ``peft`` form (mixtures of several experts,
      adapters on stacked expert weights; see the module docstring), or a
      model with no Hugging Face export.
  """
  from moe_jax.checkpoints.hf import _NP_DTYPES, converter_for_config
  from moe_jax.checkpoints.layout import unrolled

  if dtype not in _NP_DTYPES:
    raise ValueError(f"export_peft: dtype {dtype!r} is not one of {sorted(_NP_DTYPES)}")
  params = unrolled(unbox(params))
  targets = _targets(params, peft, "", [])
  if not targets:
    raise ValueError("export_peft: no adapter parameters (peft_*) in the given tree")
  conv = converter_for_config(config)
  hf_config = conv.config_to_hf(config)
  backbone, _ = split_params(params)
  where, modules = _locate(conv, config, backbone, [t[0] for t in targets])
  by_module: dict[str, list] = {}
  shapes: dict[str, tuple[int, int]] = {}
  for kernel_path, adapter, kind in targets:
    module, row0, rows, shapes[module] = where[kernel_path]
    by_module.setdefault(module, []).append((row0, rows, (adapter, kind)))
  tensors: dict[str, np.ndarray] = {}
  feedforward, patterns = [], {}
  for module, parts in sorted(by_module.items()):
    out_rows, in_features = shapes[module]
    if peft.is_lora:
      parts = sorted(parts, key=lambda p: p[0])
      tensors.update(_lora_tensors(module, [(r0, n, a) for r0, n, (a, _) in parts], peft.rank,
                                   out_rows, in_features))
      if len(parts) > 1:
        patterns[module] = len(parts)
    else:
      t, is_ff = _ia3_tensor(module, parts, out_rows, in_features)
      tensors.update(t)
      if is_ff:
        feedforward.append(module)
  adapted = sorted(by_module)
  names = _names(adapted, modules)
  ff_names = [n for n in names if any(m == n or m.endswith("." + n) for m in feedforward)]
  parameters = None
  if peft.is_lora:
    names, parameters = _split_parameters(names, adapted, modules, hf_config, patterns)
  meta = _peft_config(peft, hf_config, base_model_name_or_path, names, ff_names, patterns,
                      parameters)
  target = np.dtype(_NP_DTYPES[dtype])
  with atomic_directory(path) as tmp:
    write_json(tmp / PEFT_CONFIG_FILE, meta)
    write_safetensors(tmp, {k: v.astype(target) for k, v in tensors.items()},
                      stem=PEFT_WEIGHTS_STEM)
  return Path(path)
