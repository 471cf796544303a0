"""Rank classification and routing statistics (the PEFT sweep's measurements).

Legend: N examples, C answer choices of an example, P = Σ_N C (example,
choice) pairs, Li / Lt inputs / targets lengths, E experts, T tasks.

**Rank classification** (T0, Sanh et al. 2021): every answer choice is scored
by its log-likelihood under the model given the prompt, and the prediction is
the best-scoring choice; no generation, so a model is never wrong because it
produced a string outside the choices. The (example, choice) pairs are
flattened into P rows, scored in fixed-size batches
(:meth:`~moe_jax.train.trainer.Trainer.score_batch`, one compilation) and
folded back per example. The features are those the model trained on:

* encoder-decoder: ``encoder_input_tokens`` = inputs + EOS,
  ``decoder_target_tokens`` = choice + EOS (seqio's ``enc_dec`` converter);
* decoder-only: one causal row ``inputs + EOS + choice + EOS`` with loss
  weights on the choice part only (seqio's ``prefix_lm`` converter).

The EOS after the choice is scored too, so "4" and "41" are different answers.

**Routing statistics.** Each router sows ``expert_usage`` (mean merge weight
per expert over the real tokens of a batch; under soft merging this is the
mean router probability, under top-k the mean renormalised top-k weight, see
:mod:`moe_jax.peft.routers`). :func:`routing_by_task` runs each task's
examples (prompt + right answer) through the model and averages it per task,
per site (``encoder/layers_0/attn/peft_k``) and per layer (the mean over a
layer's sites); :func:`plot_routing` draws the per-layer tables as heatmaps.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from moe_jax.peft.routers import METRICS_COLLECTION

Features = dict[str, np.ndarray]
EOS_ID = 1


# ----------------------------------------------------------------------------- features


def _ids(vocab: Any, text: str, length: int) -> list[int]:
  """``text`` tokenised, cut to ``length - 1``, plus EOS (seqio's append_eos_after_trim)."""
  return list(vocab.encode(text))[:length - 1] + [EOS_ID]


def _pad(rows: Sequence[Sequence[int]], length: int) -> np.ndarray:
  out = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


def _shift_right(x: np.ndarray) -> np.ndarray:
  return np.concatenate([np.zeros_like(x[:, :1]), x[:, :-1]], axis=1)


def pair_features(prompts: Sequence[str], answers: Sequence[str], vocab: Any, *,
                  encoder_decoder: bool, inputs_length: int, targets_length: int) -> Features:
  """Unpacked seqio features of ``(prompt, answer)`` rows, for scoring.

  Args:
    prompts, answers: one prompt and one answer per row.
    vocab: the tasks' vocabulary (``encode(str) -> ids``).
    encoder_decoder: ``enc_dec`` features (T5) or ``prefix_lm`` ones (decoder-only).
    inputs_length, targets_length: the training task feature lengths; longer
      texts are cut as seqio cuts them.

  Returns:
    Numpy features: ``[P, Li]`` / ``[P, Lt]`` (enc-dec) or ``[P, Li + Lt]``
    (decoder-only) arrays.
  """
  if len(prompts) != len(answers):
    raise ValueError(f"pair_features: {len(prompts)} prompts but {len(answers)} answers")
  inp = [_ids(vocab, p, inputs_length) for p in prompts]
  tgt = [_ids(vocab, a, targets_length) for a in answers]
  if encoder_decoder:
    targets = _pad(tgt, targets_length)
    return {"encoder_input_tokens": _pad(inp, inputs_length),
            "decoder_target_tokens": targets,
            "decoder_input_tokens": _shift_right(targets),
            "decoder_loss_weights": (targets > 0).astype(np.int32)}
  length = inputs_length + targets_length
  targets = _pad([i + t for i, t in zip(inp, tgt)], length)
  weights = _pad([[0] * len(i) + [1] * len(t) for i, t in zip(inp, tgt)], length)
  causal = _pad([[1] * (len(i) + 1) for i in inp], length)
  return {"decoder_target_tokens": targets, "decoder_input_tokens": _shift_right(targets),
          "decoder_loss_weights": weights, "decoder_causal_attention": causal}


def _batches(features: Features, batch_size: int):
  """``(features_B, real_rows)`` chunks, the last padded with copies of its first row."""
  n = len(next(iter(features.values())))
  for start in range(0, n, batch_size):
    chunk = {k: v[start:start + batch_size] for k, v in features.items()}
    real = len(next(iter(chunk.values())))
    if real < batch_size:
      chunk = {k: np.concatenate([v, np.repeat(v[:1], batch_size - real, axis=0)])
               for k, v in chunk.items()}
    yield chunk, real


# ----------------------------------------------------------------------------- rank classification


def score_pairs(score_fn: Callable[[Features], np.ndarray], features: Features,
                batch_size: int) -> np.ndarray:
  """``[P]`` log-likelihoods, ``score_fn`` called on fixed-size batches."""
  out = []
  for chunk, real in _batches(features, batch_size):
    out.append(np.asarray(score_fn(chunk))[:real])
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def rank_classify(score_fn: Callable[[Features], np.ndarray], examples: Sequence[Any],
                  vocab: Any, *, encoder_decoder: bool, inputs_length: int,
                  targets_length: int, batch_size: int = 64
                  ) -> tuple[np.ndarray, list[np.ndarray]]:
  """Predicted choice of each example by rank classification.

  Args:
    score_fn: ``features -> [B]`` log-likelihoods (e.g. a bound
      ``Trainer.score_batch`` with its parameters).
    examples: objects with ``inputs`` (str) and ``choices`` (strs), e.g.
      :class:`moe_jax.data.instruct.InstructExample`.
    vocab, encoder_decoder, inputs_length, targets_length: see :func:`pair_features`.
    batch_size: rows per ``score_fn`` call (a multiple of the mesh's batch shards).

  Returns:
    ``(predictions [N], scores)``: the argmax choice index per example (ties:
    the first choice) and each example's ``[C]`` choice log-likelihoods.
  """
  prompts, answers, owner = [], [], []
  for i, ex in enumerate(examples):
    if not ex.choices:
      raise ValueError(f"rank_classify: example {i} ({ex.inputs!r}) has no answer choices")
    for c in ex.choices:
      prompts.append(ex.inputs)
      answers.append(c)
      owner.append(i)
  feats = pair_features(prompts, answers, vocab, encoder_decoder=encoder_decoder,
                        inputs_length=inputs_length, targets_length=targets_length)
  flat_P = score_pairs(score_fn, feats, batch_size)
  owner_P = np.asarray(owner)
  scores = [flat_P[owner_P == i] for i in range(len(examples))]
  preds = np.asarray([int(np.argmax(s)) for s in scores], np.int32)
  return preds, scores


def accuracy(preds: np.ndarray, examples: Sequence[Any]) -> float:
  labels = np.asarray([ex.label for ex in examples])
  return float(np.mean(preds == labels)) if len(labels) else float("nan")


def chance_accuracy(examples: Sequence[Any]) -> float:
  """Expected accuracy of a uniform random choice."""
  return float(np.mean([1.0 / len(ex.choices) for ex in examples]))


# ----------------------------------------------------------------------------- routing


def _name(k: Any) -> str:
  for attr in ("key", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def expert_usage_by_site(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """``{site: [E]}`` from a sown ``moe_metrics`` state (calls of a site averaged).

  A site is the path of the adapter, ``encoder/layers_0/attn/peft_k``.
  """
  out: dict[str, list[np.ndarray]] = {}
  flat = jax.tree_util.tree_flatten_with_path(state.get(METRICS_COLLECTION, {}))[0]
  for path, leaf in flat:
    names = [_name(k) for k in path]
    if "expert_usage" not in names:
      continue
    cut = names.index("expert_usage")
    site = "/".join(n for n in names[:cut] if n != "router")
    out.setdefault(site, []).append(np.asarray(leaf, np.float64))
  return {k: np.mean(v, axis=0) for k, v in sorted(out.items())}


def layer_of(site: str) -> str:
  """``encoder/layers_0/attn/peft_k`` -> ``encoder/layers_0`` (the path up to ``layers_N``)."""
  parts = site.split("/")
  for i, p in enumerate(parts):
    if p.startswith("layers_"):
      return "/".join(parts[:i + 1])
  return parts[0]


def routing_by_task(model: Any, params: Any, examples_by_task: Mapping[str, Sequence[Any]],
                    vocab: Any, *, inputs_length: int, targets_length: int,
                    batch_size: int = 32) -> dict[str, Any]:
  """Mean router merge weights per task, site and layer.

  Each task's examples (prompt + right answer) run through the model in
  batches of ``batch_size`` rows (a short task forms one smaller batch; a
  remainder that does not fill a batch is dropped, so no row is counted twice).

  Returns:
    ``{"tasks": [T], "sites": {site: [T, E]}, "layers": {layer: [T, E]}}``
    (numpy arrays; ``layers`` averages the sites of each layer).
  """
  encoder_decoder = hasattr(model.module, "encode")

  @jax.jit
  def usage(p, batch):
    _, state = model.apply(p, batch, mutable=(METRICS_COLLECTION,))
    return state

  tasks = list(examples_by_task)
  per_task: list[dict[str, np.ndarray]] = []
  for task in tasks:
    exs = list(examples_by_task[task])
    if not exs:
      raise ValueError(f"routing_by_task: task {task!r} has no examples")
    bs = min(batch_size, len(exs))
    exs = exs[:len(exs) - len(exs) % bs]
    feats = pair_features([e.inputs for e in exs], [e.targets for e in exs], vocab,
                          encoder_decoder=encoder_decoder, inputs_length=inputs_length,
                          targets_length=targets_length)
    feats = {k: v for k, v in feats.items() if k != "decoder_causal_attention"}
    # segment ids mark padding (0), so routers leave pad tokens out of the averages
    feats["decoder_segment_ids"] = (feats["decoder_target_tokens"] > 0).astype(np.int32)
    if encoder_decoder:
      feats["encoder_segment_ids"] = (feats["encoder_input_tokens"] > 0).astype(np.int32)
    sums: dict[str, np.ndarray] = {}
    n = 0
    for chunk, _ in _batches(feats, bs):
      for site, u in expert_usage_by_site(jax.device_get(usage(params, chunk))).items():
        sums[site] = sums.get(site, 0.0) + u
      n += 1
    per_task.append({k: v / n for k, v in sums.items()})
  sites = sorted(per_task[0]) if per_task else []
  if not sites:
    raise ValueError("routing_by_task: the model has no routers (not a mov / molora model)")
  by_site = {s: np.stack([t[s] for t in per_task]) for s in sites}
  layers: dict[str, list[np.ndarray]] = {}
  for s, v in by_site.items():
    layers.setdefault(layer_of(s), []).append(v)
  by_layer = {k: np.mean(v, axis=0) for k, v in layers.items()}
  return {"tasks": tasks, "sites": by_site, "layers": by_layer}


def plot_routing(routing: Mapping[str, Any], path: str, *, title: str = "",
                 held_out: Sequence[str] = ()) -> str:
  """Heatmaps of ``routing["layers"]``: one panel per layer, tasks x experts.

  Held-out task names get a ``*``. Writes a PNG (matplotlib, Agg backend).
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  layers = list(routing["layers"])
  tasks = [t + (" *" if t in held_out else "") for t in routing["tasks"]]
  n = len(layers)
  cols = min(n, 4)
  rows = -(-n // cols)
  e = next(iter(routing["layers"].values())).shape[1]
  size = (3.0 + 0.28 * e * cols, 0.9 + 0.32 * len(tasks) * rows)
  fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, constrained_layout=True)
  vmax = max(float(np.max(v)) for v in routing["layers"].values())
  im = None
  for i, ax in enumerate(axes.flat):
    if i >= n:
      ax.axis("off")
      continue
    im = ax.imshow(routing["layers"][layers[i]], aspect="auto", cmap="viridis", vmin=0.0,
                   vmax=vmax)
    ax.set_title(layers[i], fontsize=8)
    ax.set_xticks(range(e))
    ax.set_xticklabels([str(j) for j in range(e)], fontsize=6)
    ax.set_yticks(range(len(tasks)))
    ax.set_yticklabels(tasks if i % cols == 0 else [""] * len(tasks), fontsize=7)
    ax.set_xlabel("expert", fontsize=7)
  if im is not None:
    fig.colorbar(im, ax=axes, shrink=0.6, label="mean router weight")
  if title:
    fig.suptitle(title, fontsize=9)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
