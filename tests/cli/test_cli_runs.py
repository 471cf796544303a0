"""The CLIs as users run them (``python -m ...`` subprocesses), with bad input and clashes.

Each test here failed on the code before issue 22: two trainings on one
``--model_dir`` both ran, a mistyped macro was ignored, a failed rerun
overwrote the old run's ``model_config.json`` / ``config.gin``, errors ended in
tracebacks after ``config.gin`` was written, ``--num_experts 0`` made a
1-expert model.
"""

import hashlib
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--gin.BATCH_SIZE=8", "--gin.LOG_EVERY=1", "--gin.EVAL_EVERY=None",
        "--gin.train.eval_dataset=None", "--gin.TrainerConfig.progress_bar=False",
        "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.MESH_DATA=2"] + [
            f"--gin_bindings=DecoderConfig.{k} = {v}" for k, v in
            (("d_model", 32), ("num_layers", 1), ("num_heads", 2), ("num_kv_heads", 2),
             ("d_ff", 64))]
LM = ["--gin_file=experiments/decoder_tiny_lm.gin", *TINY]


def _env() -> dict:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
  return env


def _popen(module: str, args: list[str]) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(module: str, args: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=600)


def _error_line(err: str) -> str:
  """The CLI's report: one ``error: ...`` line (more only for diffs / gin locations), no
  traceback."""
  assert "Traceback" not in err, err[-3000:]
  lines = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, err[-3000:]
  return err[err.index("error: "):]


def _snapshot(d: Path) -> dict[str, str]:
  return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(d.rglob("*")) if p.is_file()}


def test_mistyped_macros_are_errors_before_anything_is_written(tmp_path):
  out = _run("moe_jax.train", [*LM, f"--model_dir={tmp_path / 'run'}", "--gin.TRAIN_STEPZ=3",
                               "--gin.LOSS_Z=0"])
  assert out.returncode == 2, out.stderr[-3000:]
  err = _error_line(out.stderr)
  assert "TRAIN_STEPZ is set but never used; did you mean TRAIN_STEPS?" in err
  assert "LOSS_Z is set but never used" in err and "command line" in err
  assert not (tmp_path / "run").exists() and not (tmp_path / "run.lock").exists()


def test_a_failed_rerun_changes_nothing(tmp_path):
  d = tmp_path / "run"
  first = _run("moe_jax.train", [*LM, f"--model_dir={d}", "--gin.TRAIN_STEPS=2"])
  assert first.returncode == 0, first.stderr[-3000:]
  before = _snapshot(d)
  assert "config.gin" in before and "model_config.json" in before
  # Another architecture into the decoder's directory: refused, with the model diff.
  t5 = _popen("moe_jax.train", ["--gin_file=experiments/t5_tiny_mix.gin", f"--model_dir={d}",
                                "--gin.TRAIN_STEPS=2", "--gin.MESH_DATA=2"])
  # The same run with another seed: refused, with the config diff.
  seed = _run("moe_jax.train", [*LM, f"--model_dir={d}", "--gin.TRAIN_STEPS=2", "--gin.SEED=1"])
  _, t5_err = t5.communicate(timeout=600)
  assert t5.returncode == 1, t5_err[-3000:]
  assert "holds checkpoints of another model" in _error_line(t5_err)
  assert seed.returncode == 1, seed.stderr[-3000:]
  err = _error_line(seed.stderr)
  assert "configured differently" in err and "-SEED = 0" in err and "+SEED = 1" in err
  assert _snapshot(d) == before  # bit-identical: nothing was touched
  from moe_jax.checkpoints.orbax import load_latest
  assert load_latest(d).source.endswith("@step2")


def test_two_trainings_on_one_model_dir(tmp_path):
  d = tmp_path / "run"
  first = _popen("moe_jax.train", [*LM, f"--model_dir={d}", "--gin.TRAIN_STEPS=100000",
                                   "--gin.CHECKPOINT_EVERY=1000000"])
  try:
    end = time.time() + 600
    while not (d / "config.gin").exists():
      assert first.poll() is None, first.communicate()[1][-3000:]
      assert time.time() < end
      time.sleep(0.5)
    before = _snapshot(d)
    second = _run("moe_jax.train", [*LM, f"--model_dir={d}", "--gin.TRAIN_STEPS=2",
                                    "--gin.SEED=1"])
    assert second.returncode == 1, second.stderr[-3000:]
    err = _error_line(second.stderr)
    assert f"in use by pid {first.pid}" in err and f"{d}.lock" in err
    after = _snapshot(d)
    assert after["config.gin"] == before["config.gin"]  # the first run's config stays
    assert not (d / "checkpoints" / "2").exists()
  finally:
    first.kill()
    first.communicate()


def test_unknown_task_and_unwritable_model_dir_are_one_line(tmp_path):
  d = tmp_path / "run"
  task = _popen("moe_jax.train", [*LM, f"--model_dir={d}", "--gin.TRAIN_STEPS=2",
                                  "--gin.MIXTURE_OR_TASK_NAME='no_such_task'"])
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  unwritable = _run("moe_jax.train", [*LM, f"--model_dir={blocker / 'run'}",
                                      "--gin.TRAIN_STEPS=2"])
  _, task_err = task.communicate(timeout=600)
  assert task.returncode == 1
  assert "no_such_task" in _error_line(task_err)
  assert not d.exists()  # no config.gin, nothing
  assert unwritable.returncode == 1
  assert str(blocker) in _error_line(unwritable.stderr)


@pytest.mark.parametrize("flag", ["--num_experts", "--top_k"])
def test_upcycle_takes_zero_literally(tmp_path, flag):
  args = ["--method", "sparse", "--checkpoints", tmp_path / "dense", "--out", tmp_path / "out",
          "--num_experts", "4", flag, "0"]
  if flag == "--num_experts":
    args = args[:-4] + [flag, "0"]
  out = _run("moe_jax.upcycle", args)
  assert out.returncode != 0
  assert f"{flag.lstrip('-')} must be a positive integer, got 0" in out.stderr
  assert not (tmp_path / "out").exists()


def test_upcycle_model_takes_zero_literally():
  from moe_jax import api
  dense = [types.SimpleNamespace(config=None, params=None, source="dense")]
  for kwargs in ({"num_experts": 0}, {"num_experts": -2}, {"num_experts": 4, "top_k": 0}):
    with pytest.raises(ValueError, match="must be a positive integer"):
      api.upcycle_model(dense, method="sparse", **kwargs)
