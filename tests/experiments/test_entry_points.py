"""The experiments run as the README and `make demo` start them: ``python -m experiments.X``
from the repository root (experiments/ is not installed with the library)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", ["experiments.calm_kv_arithmetic", "experiments.peft_sweep",
                                    "experiments.bam_vs_btx"])
def test_python_dash_m_from_the_repository_root(module):
  out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert f"usage: python -m {module}" in out.stdout


def test_make_demo_runs_the_calm_experiment_and_bench_only_benchmarks():
  makefile = (ROOT / "Makefile").read_text()
  assert "-m experiments.calm_kv_arithmetic --out out/calm_repro" in makefile
  assert not [p for p in (ROOT / "benchmarks").glob("[!_]*.py") if "upcycle" in p.name]


def test_experiments_are_not_installed_with_the_library():
  toml = (ROOT / "pyproject.toml").read_text()
  assert 'include = ["moe_jax*", "calm_jax*"]' in toml
