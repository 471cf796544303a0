"""One way to assemble a run: ``api.finetune`` and ``python -m moe_jax.train`` train the same
steps, and ``python -m moe_jax.eval`` runs as the README shows it (both CLIs as subprocesses)."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

import moe_jax as mj
from moe_jax.checkpoints import save_model
from moe_jax.models.t5 import T5Config
from moe_jax.train.wrappers import EncoderDecoderModel

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CONFIG = T5Config(vocab_size=384, d_model=32, d_kv=16, d_ff=64, num_layers=1,
                  num_decoder_layers=1, num_heads=2)
TASK, LENGTHS, STEPS, BATCH = "synthetic_mix", {"inputs": 32, "targets": 24}, 4, 8


def _env() -> dict[str, str]:
  env = dict(os.environ)  # tests/conftest.py's 8 fake CPU devices
  env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # as tests/conftest.py sets in-process
  return env


def _cli(module: str, args: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module", name="cli_run")
def _cli_run(tmp_path_factory):
  """A tiny T5 checkpoint, and a ``python -m moe_jax.train`` fine-tuning of it."""
  tmp = tmp_path_factory.mktemp("run")
  shapes = nn.meta.unbox(EncoderDecoderModel(CONFIG).abstract_boxed_params())
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  ckpt = save_model(tmp / "base", CONFIG, params)
  model_dir = tmp / "cli"
  out = _cli("moe_jax.train", [
      "--gin_file=runs/finetune.gin", f"--model_dir={model_dir}",
      f"--gin.INIT_CHECKPOINT={str(ckpt)!r}", f"--gin.MIXTURE_OR_TASK_NAME={TASK!r}",
      f"--gin.TASK_FEATURE_LENGTHS={LENGTHS!r}", f"--gin.TRAIN_STEPS={STEPS}",
      f"--gin.BATCH_SIZE={BATCH}", "--gin.OPTIMIZER='adamw'", "--gin.LOG_EVERY=1",
      "--gin.MESH_DATA=2", "--gin.train.eval_dataset=None", "--gin.INFER_EVAL=None",
      "--gin.TrainerConfig.progress_bar=False"])
  assert out.returncode == 0, out.stderr[-3000:]
  return ckpt, model_dir


def _metrics(model_dir: Path) -> list[dict]:
  return [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]


def test_finetune_and_the_train_cli_give_the_same_losses(cli_run, tmp_path):
  ckpt, model_dir = cli_run
  cli = {r["step"]: r["loss"] for r in _metrics(model_dir) if r["split"] == "train"}
  # finetune's defaults are the settings above (AdamW, constant 1e-3, no warm-up or clipping).
  run = mj.finetune(mj.load(ckpt), TASK, steps=STEPS, batch_size=BATCH, feature_lengths=LENGTHS,
                    mesh={"data": 2}, log_every=1, model_dir=tmp_path / "api")
  steps, losses = run.losses()
  assert steps.tolist() == sorted(cli) == list(range(1, STEPS + 1))
  np.testing.assert_allclose(losses, [cli[s] for s in steps], rtol=1e-6, atol=0)
  assert len(set(losses.tolist())) == STEPS  # the loss moved: a real comparison
  assert (model_dir / "config.gin").exists()  # the CLI's operative config
  assert (tmp_path / "api" / "checkpoints" / str(STEPS)).is_dir()


def _readme_eval_command() -> list[str]:
  section = README.read_text().split("## Training (t5x style)\n", 1)[1]
  block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).replace("\\\n", " ")
  line = next(l for l in block.splitlines() if l.startswith("python -m moe_jax.eval "))
  return shlex.split(line)[3:]


def test_eval_cli_as_the_readme_shows_it(cli_run):
  _, model_dir = cli_run
  args = _readme_eval_command()
  assert "--checkpoint=/tmp/t5" in args and "--gin_file=runs/eval.gin" in args
  args = [f"--checkpoint={model_dir}" if a == "--checkpoint=/tmp/t5" else a for a in args]
  out = _cli("moe_jax.eval", args + ["--gin.BATCH_SIZE=8", "--gin.EVAL_STEPS=1",
                                     "--gin.INFER_NUM_EXAMPLES=8"])
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [r for r in _metrics(model_dir) if r["step"] == STEPS]
  loss = [r for r in rows if r["split"] == "validation"]
  assert loss and np.isfinite(loss[-1]["loss"]) and loss[-1]["num_batches"] == 1
  assert any(r["split"].startswith("validation/synthetic_") for r in rows)
  assert "'loss':" in out.stdout and "'tasks':" in out.stdout
