"""Every ``python -m moe_jax...`` command in the README's ```bash blocks runs, as users run it.

The commands are parsed from README.md (a changed command is tested as
written) and run as subprocesses in order, with small overrides: tiny model
sizes and 2 steps for trainings (gin bindings appended), README paths
(``/tmp/...``, ``DIR``, ``DENSE``, ``OUT``, ...) mapped into a temporary
directory, dense inputs made as tiny Llama checkpoints. Skipped, with the
reason: commands that need a TPU pod or a SLURM cluster, and the full PEFT
sweep (``tests/experiments/test_peft_sweep.py`` runs it).
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TRAIN_OVERRIDES = [
    "DecoderConfig.d_model = 32", "DecoderConfig.num_layers = 1", "DecoderConfig.num_heads = 2",
    "DecoderConfig.num_kv_heads = 2", "DecoderConfig.d_ff = 64",
    "T5Config.d_model = 32", "T5Config.d_kv = 16", "T5Config.d_ff = 64", "T5Config.num_layers = 1",
    "T5Config.num_decoder_layers = 1", "T5Config.num_heads = 2",
    "TRAIN_STEPS = 2", "BATCH_SIZE = 8", "EVAL_STEPS = 1", "INFER_NUM_EXAMPLES = 8",
    "TrainerConfig.progress_bar = False", "MESH_DATA = 2", "train.eval_dataset = None"]
KV_TASK = ["kv_task.num_train = 256", "kv_task.num_eval = 16", "WARMUP_STEPS = 0"]
#: Why a README command is not run here.
SKIPPED = {"gcloud": "needs a TPU pod", "srun": "needs a SLURM GPU cluster",
           "moe_jax.plan": "pod-size AOT plans; tests/train/test_plan.py runs the plan CLI",
           "experiments.peft_sweep": "hours (--quick: 1-2 min); tests/experiments/"
                                     "test_peft_sweep.py runs the sweep"}


def readme_commands() -> list[tuple[str, str]]:
  """``(command, skip reason or '')`` of every ``python -m`` line in a ```bash block."""
  out = []
  for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split(" #")[0].strip()
      if "python -m" not in line:
        continue
      reason = next((why for key, why in SKIPPED.items() if key in line.split("python -m")[0]
                     or line.split("python -m")[1].split()[0] == key), "")
      out.append((line, reason))
  return out


def _env() -> dict:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  return env


def _dense_checkpoints(tmp: Path) -> dict[str, str]:
  """Tiny Llama checkpoints for DIR (with a tokenizer.json) / DENSE / SEED / BRANCH1 / BRANCH2."""
  code = ("import sys, numpy as np, jax, flax.linen as nn\n"
          "from moe_jax.checkpoints import export_hf\n"
          "from moe_jax.models.decoder import DecoderConfig\n"
          "from moe_jax.train.wrappers import DecoderOnlyModel\n"
          "c = DecoderConfig(vocab_size=384, d_model=32, num_layers=2, num_heads=2, d_ff=64,"
          " hf_model_type='llama')\n"
          "shapes = nn.meta.unbox(DecoderOnlyModel(c).abstract_boxed_params())\n"
          "for i, name in enumerate(sys.argv[1:]):\n"
          "  rng = np.random.default_rng(i)\n"
          "  p = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype),"
          " shapes)\n"
          "  export_hf(name, c, p)\n"
          "from tokenizers import Tokenizer, models, pre_tokenizers\n"
          "t = Tokenizer(models.WordLevel({'[UNK]': 0, 'Hello': 1}, unk_token='[UNK]'))\n"
          "t.pre_tokenizer = pre_tokenizers.Whitespace()\n"
          "t.save(sys.argv[1] + '/tokenizer.json')\n")
  names = {k: str(tmp / k.lower()) for k in ("DIR", "DENSE", "SEED", "BRANCH1", "BRANCH2")}
  subprocess.run([sys.executable, "-c", code, *names.values()], cwd=ROOT, env=_env(),
                 check=True, timeout=600)
  return names


def _adapt(argv: list[str], tmp: Path, names: dict[str, str]) -> list[str]:
  """README arguments with paths mapped into ``tmp`` and (trainings) tiny overrides."""
  def path(text: str) -> str:
    text = re.sub(r"/tmp/", f"{tmp}/", text)
    return names.get(text, text)

  args = [path(a) if not a.startswith("--gin.") else re.sub(r"/tmp/", f"{tmp}/", a)
          for a in argv]
  module = args[0]
  if module == "moe_jax.train":
    gin_file = next(a for a in args if a.startswith("--gin_file="))
    extra = list(TRAIN_OVERRIDES)
    if "calm" in gin_file:  # the composition needs 2 layers in each LM
      extra += KV_TASK + ["DecoderConfig.num_layers = 2"]
    if "t5_tiny_mix" not in gin_file:
      extra.append("INFER_EVAL = None")
    args += [f"--gin_bindings={b}" for b in extra]
  if module == "moe_jax.eval":
    args += ["--gin.EVAL_STEPS=1", "--gin_bindings=InferEvalConfig.num_examples = 8"]
  if module == "moe_jax.generate" and "--max_new_tokens" not in args:
    args += ["--max_new_tokens", "2"]
  return args


def test_every_readme_command_runs(tmp_path):
  commands = readme_commands()
  assert len(commands) >= 8
  ran = []
  names = None
  for line, reason in commands:
    if reason:
      print(f"skipped: {line[:80]}... ({reason})")
      continue
    argv = shlex.split(line)
    argv = argv[argv.index("-m") + 1:]
    if names is None:
      names = _dense_checkpoints(tmp_path)
    args = _adapt(argv, tmp_path, {**names, "OUT": str(tmp_path / "out")})
    out = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"README command failed: {line}\n{out.stderr[-3000:]}"
    ran.append(args[0])
  assert {"moe_jax.train", "moe_jax.generate", "moe_jax.upcycle"} <= set(ran), ran
