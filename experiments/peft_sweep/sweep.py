"""The PEFT sweep: MoV / MoLoRA vs (IA)^3 / LoRA / full fine-tuning at CPU scale.

One command (Zadouri et al. 2023, arXiv 2309.05444, in miniature)::

    python -m experiments.peft_sweep --out out/peft_sweep            # ~25 min on 2 CPU cores
    python -m experiments.peft_sweep --out /tmp/peft_quick --quick   # ~1-2 min smoke version

For each backbone (a tiny T5 and a tiny decoder):

1. **pretrain** it with the trainer from
   ``gin_configs/experiments/peft_sweep/pretrain_<backbone>.gin`` on the facts
   corpus (:mod:`moe_jax.data.instruct`);
2. **fine-tune** it on the six held-in instruction tasks with every method,
   each from ``gin_configs/experiments/peft_sweep/<method>.gin`` with the
   same step budget, batch and data order (``python -m moe_jax.train`` runs
   the very same files);
3. **evaluate** held-in tasks (validation entities) and the four held-out
   tasks (zero-shot) by rank classification (:mod:`experiments.peft_sweep.analysis`),
   and, for the mixtures, the mean router weight per task, layer and expert.

Nothing here trains: each run is :func:`moe_jax.train.run.train`, configured
from its gin file as ``python -m moe_jax.train`` configures it. A run
directory that already holds its final checkpoint is resumed (so it is not
trained again): rerunning the command only evaluates.

Writes into ``--out``: ``results.md`` (the table), ``results.json`` (every
number, per-task accuracies included), ``routing_<backbone>_<method>.png``
(heatmaps) and ``.json`` (the numbers behind them), and the run directories
``<backbone>/<method>/`` and ``backbone_<backbone>/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

GIN_DIR = "experiments/peft_sweep"

#: method -> table label; the gin file is ``<GIN_DIR>/<method>.gin``.
METHODS: dict[str, str] = {
    "full": "full fine-tuning",
    "ia3": "(IA)^3",
    "lora": "LoRA (r=4)",
    "mov5": "MoV-5",
    "mov10": "MoV-10",
    "mov30": "MoV-30",
    "molora2": "MoLoRA-2",
    "molora10": "MoLoRA-10",
    "mov10_top1": "MoV-10 top-1",
    "mov10_top2": "MoV-10 top-2",
}
BACKBONES = ("t5", "decoder")
INPUTS_LENGTH = 80   # TASK_FEATURE_LENGTHS of finetune.gin
TARGETS_LENGTH = 12


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepConfig:
  """What the sweep runs.

  Attributes:
    methods: per backbone, the methods (keys of :data:`METHODS`) to fine-tune.
    pretrain_steps: backbone pretraining steps.
    finetune_steps: the step budget of every method.
    eval_examples: validation examples per task for rank classification.
    routing_examples: examples per task for the routing statistics.
    score_batch_size: rows per scoring call (a multiple of the mesh's batch shards).
  """

  methods: Mapping[str, tuple[str, ...]]
  pretrain_steps: int
  finetune_steps: int
  eval_examples: int
  routing_examples: int
  score_batch_size: int = 64

  def __post_init__(self):
    for backbone, methods in self.methods.items():
      if backbone not in BACKBONES:
        raise ValueError(f"SweepConfig.methods: unknown backbone {backbone!r}; choose from "
                         f"{BACKBONES}")
      bad = [m for m in methods if m not in METHODS]
      if bad:
        raise ValueError(f"SweepConfig.methods[{backbone!r}]: unknown method(s) {bad}; "
                         f"choose from {tuple(METHODS)}")
    for name in ("pretrain_steps", "finetune_steps", "eval_examples", "routing_examples",
                 "score_batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"SweepConfig.{name} must be >= 1, got {getattr(self, name)}")

  @property
  def num_runs(self) -> int:
    return sum(1 + len(m) for m in self.methods.values())


DEFAULT = SweepConfig(
    methods={"t5": tuple(METHODS),
             "decoder": ("full", "ia3", "lora", "mov10", "molora10")},
    pretrain_steps=1000, finetune_steps=400, eval_examples=200, routing_examples=64)
QUICK = SweepConfig(methods={"t5": ("full", "mov10")}, pretrain_steps=30,
                    finetune_steps=10, eval_examples=16, routing_examples=16)


# ----------------------------------------------------------------------------- runs


def _train(gin_file: str, bindings: Sequence[str]) -> Any:
  """Runs one gin file as ``python -m moe_jax.train`` would; returns the final state."""
  from moe_jax.cli import configurables
  from moe_jax.train import run

  configurables.parse_gin([gin_file], list(bindings))
  return configurables.run(run.train)


def _configured_model() -> Any:
  """The model wrapper of the parsed gin config (``MODEL = @peft.adapted_model()``)."""
  from moe_jax.cli import configurables
  from moe_jax.peft.training import adapted_model

  return configurables.run(adapted_model)


def evaluate(model: Any, params: Any, config: SweepConfig) -> dict[str, float]:
  """Rank-classification accuracy of every instruction task (validation split)."""
  from moe_jax.data import instruct
  from moe_jax.data.tasks import default_vocabulary
  from experiments.peft_sweep import analysis
  from moe_jax.train.run import build_trainer
  from moe_jax.train.trainer import TrainerConfig

  trainer = build_trainer(model, trainer=TrainerConfig(num_train_steps=0, progress_bar=False),
                          eval_only=True)
  vocab = default_vocabulary()
  out = {}
  for task in instruct.TASK_NAMES:
    exs = instruct.instruct_examples(task, "validation", num_examples=config.eval_examples)
    preds, _ = analysis.rank_classify(
        lambda f: trainer.score_batch(params, f), exs, vocab,
        encoder_decoder=hasattr(model.module, "encode"), inputs_length=INPUTS_LENGTH,
        targets_length=TARGETS_LENGTH, batch_size=config.score_batch_size)
    out[task] = analysis.accuracy(preds, exs)
  return out


def summarize(acc: Mapping[str, float]) -> dict[str, float]:
  from moe_jax.data import instruct

  return {"held_in": float(np.mean([acc[t] for t in instruct.HELD_IN])),
          "held_out": float(np.mean([acc[t] for t in instruct.HELD_OUT]))}


def trainable_share(method: str, params: Any) -> float:
  """Trainable parameters as a percentage of the backbone's (100 for full fine-tuning)."""
  from moe_jax.peft.params import parameter_report

  return 100.0 if method == "full" else parameter_report(params)["share_percent"]


def routing(model: Any, params: Any, config: SweepConfig, out: Path, name: str,
            title: str) -> dict[str, Any]:
  """Routing statistics of a mixture run: writes ``<name>.json`` and ``<name>.png``."""
  from moe_jax.data import instruct
  from moe_jax.data.tasks import default_vocabulary
  from experiments.peft_sweep import analysis

  r = analysis.routing_by_task(
      model, params, instruct.by_task(instruct.TASK_NAMES, "validation",
                                      config.routing_examples),
      default_vocabulary(), inputs_length=INPUTS_LENGTH, targets_length=TARGETS_LENGTH)
  analysis.plot_routing(r, str(out / f"{name}.png"), title=title, held_out=instruct.HELD_OUT)
  data = {"tasks": r["tasks"], "held_out": list(instruct.HELD_OUT),
          "layers": {k: v.round(5).tolist() for k, v in r["layers"].items()},
          "sites": {k: v.round(5).tolist() for k, v in r["sites"].items()}}
  (out / f"{name}.json").write_text(json.dumps(data, indent=1))
  return r


def routing_summary(r: Mapping[str, Any]) -> dict[str, float]:
  """How task-specific routing is: mean over layers of the total variation distance
  between each task's expert distribution and the all-task mean (0: identical)."""
  tvs = []
  for v_TE in r["layers"].values():
    tvs.append(0.5 * np.abs(v_TE - v_TE.mean(axis=0, keepdims=True)).sum(axis=1).mean())
  return {"task_tv_distance": float(np.mean(tvs))}


# ----------------------------------------------------------------------------- the sweep


def run_sweep(config: SweepConfig, out: str | Path, *,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Pretrains, fine-tunes and evaluates (module docstring); returns the result rows."""
  from moe_jax.data import instruct
  from moe_jax.peft.training import adapted_model
  from moe_jax.checkpoints.orbax import load_latest
  from moe_jax.train.wrappers import model_from_checkpoint

  out = Path(out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  rows: list[dict[str, Any]] = []
  start = time.perf_counter()
  done = 0

  def progress(backbone: str, method: str, row: Mapping[str, Any], seconds: float) -> None:
    nonlocal done
    done += 1
    elapsed = time.perf_counter() - start
    log(f"[sweep {done}/{config.num_runs}] {backbone} {method}: held-in "
        f"{row['held_in']:.3f} held-out {row['held_out']:.3f} trainable "
        f"{row['trainable_percent']:.3g}% ({seconds:.0f} s; elapsed {elapsed / 60:.1f} min)")

  for backbone, methods in config.methods.items():
    t0 = time.perf_counter()
    bdir = out / f"backbone_{backbone}"
    log(f"[sweep] pretraining the {backbone} backbone ({config.pretrain_steps} steps) -> {bdir}")
    _train(f"{GIN_DIR}/pretrain_{backbone}.gin",
           [f"MODEL_DIR = {str(bdir)!r}", f"TRAIN_STEPS = {config.pretrain_steps}"])
    base = adapted_model(model_from_checkpoint(str(bdir)), None, allow_causal_prefix_lm=True)
    params = load_latest(bdir).params
    acc = evaluate(base, params, config)
    row = {"backbone": backbone, "method": "none", "label": "backbone, no fine-tuning",
           "trainable_percent": 0.0, "steps": 0, **summarize(acc), "tasks": acc,
           "seconds": time.perf_counter() - t0}
    rows.append(row)
    progress(backbone, "pretrain", row, row["seconds"])
    for method in methods:
      t0 = time.perf_counter()
      mdir = out / backbone / method
      state = _train(f"{GIN_DIR}/{method}.gin",
                     [f"INIT_CHECKPOINT = {str(bdir)!r}", f"MODEL_DIR = {str(mdir)!r}",
                      f"TRAIN_STEPS = {config.finetune_steps}"])
      model = _configured_model()
      acc = evaluate(model, state.params, config)
      row = {"backbone": backbone, "method": method, "label": METHODS[method],
             "trainable_percent": trainable_share(method, state.params),
             "steps": config.finetune_steps, **summarize(acc), "tasks": acc}
      if method.startswith(("mov", "molora")):
        name = f"routing_{backbone}_{method}"
        r = routing(model, state.params, config, out, name,
                    f"{METHODS[method]} on the {backbone} backbone: mean router weight per "
                    "expert, by task (* held out) and layer")
        row.update(routing_summary(r), routing_plot=f"{name}.png")
      row["seconds"] = time.perf_counter() - t0
      rows.append(row)
      progress(backbone, method, row, row["seconds"])
      write_results(rows, out, config, time.perf_counter() - start)
  write_results(rows, out, config, time.perf_counter() - start)
  chance = {t: instruct_chance(t, config) for t in instruct.TASK_NAMES}
  log(f"[sweep] done in {(time.perf_counter() - start) / 60:.1f} min; chance: held-in "
      f"{summarize(chance)['held_in']:.3f} held-out {summarize(chance)['held_out']:.3f}; "
      f"table: {out / 'results.md'}")
  return rows


def instruct_chance(task: str, config: SweepConfig) -> float:
  from moe_jax.data import instruct
  from experiments.peft_sweep import analysis

  return analysis.chance_accuracy(
      instruct.instruct_examples(task, "validation", num_examples=config.eval_examples))


def results_table(rows: Sequence[Mapping[str, Any]], config: SweepConfig) -> str:
  """The markdown table of ``results.md``."""
  from moe_jax.data import instruct

  chance = summarize({t: instruct_chance(t, config) for t in instruct.TASK_NAMES})
  lines = ["| backbone | method | trainable % | held-in acc | held-out acc | routing TV | "
           "time (s) |", "|---|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    tv = f"{r['task_tv_distance']:.3f}" if "task_tv_distance" in r else ""
    lines.append(f"| {r['backbone']} | {r['label']} | {r['trainable_percent']:.3g} | "
                 f"{r['held_in']:.3f} | {r['held_out']:.3f} | {tv} | {r['seconds']:.0f} |")
  lines.append(f"| | chance | | {chance['held_in']:.3f} | {chance['held_out']:.3f} | | |")
  return "\n".join(lines)


def per_task_table(rows: Sequence[Mapping[str, Any]]) -> str:
  from moe_jax.data import instruct

  names = [t.replace("instruct_", "") + (" *" if t in instruct.HELD_OUT else "")
           for t in instruct.TASK_NAMES]
  lines = ["| backbone | method | " + " | ".join(names) + " |",
           "|---|---|" + "---:|" * len(names)]
  for r in rows:
    lines.append(f"| {r['backbone']} | {r['label']} | "
                 + " | ".join(f"{r['tasks'][t]:.2f}" for t in instruct.TASK_NAMES) + " |")
  return "\n".join(lines)


def write_results(rows: Sequence[Mapping[str, Any]], out: Path, config: SweepConfig,
                  seconds: float) -> None:
  from moe_jax.data import instruct

  text = [f"# PEFT sweep ({config.finetune_steps} fine-tuning steps per method, "
          f"{config.pretrain_steps} pretraining steps, {config.eval_examples} validation "
          f"examples per task; {seconds / 60:.1f} min)", "",
          "Accuracy by rank classification. Held-in: " + ", ".join(instruct.HELD_IN)
          + " (validation entities). Held-out (zero-shot): " + ", ".join(instruct.HELD_OUT)
          + ". Trainable %: of the backbone's parameters. Routing TV: mean total-variation "
          "distance between a task's expert distribution and the all-task mean "
          "(0 = routing ignores the task).", "", results_table(rows, config), "",
          "Per task (* held out):", "", per_task_table(rows), ""]
  (out / "results.md").write_text("\n".join(text))
  (out / "results.json").write_text(json.dumps(
      {"config": dataclasses.asdict(config) | {"methods": {k: list(v) for k, v in
                                                           config.methods.items()}},
       "rows": list(rows), "seconds": seconds}, indent=1))


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.peft_sweep", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="output directory (table, heatmaps, runs)")
  p.add_argument("--quick", action="store_true", help="the ~1-2 minute smoke version")
  p.add_argument("--backbones", default=None,
                 help=f"comma-separated subset of {','.join(BACKBONES)}")
  p.add_argument("--methods", default=None,
                 help=f"comma-separated subset of {','.join(METHODS)}")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  config = QUICK if args.quick else DEFAULT
  methods = dict(config.methods)
  try:
    if args.backbones:
      keep = args.backbones.split(",")
      bad = [b for b in keep if b not in BACKBONES]
      if bad:
        raise ValueError(f"--backbones: unknown {bad}; choose from {BACKBONES}")
      methods = {b: m for b, m in methods.items() if b in keep}
    if args.methods:
      keep = args.methods.split(",")
      bad = [m for m in keep if m not in METHODS]
      if bad:
        raise ValueError(f"--methods: unknown {bad}; choose from {tuple(METHODS)}")
      methods = {b: tuple(x for x in m if x in keep) for b, m in methods.items()}
    config = dataclasses.replace(config, methods=methods)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  run_sweep(config, args.out)
  print((Path(args.out) / "results.md").read_text())
  return 0


if __name__ == "__main__":
  sys.exit(main())
