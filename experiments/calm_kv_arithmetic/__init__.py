"""CALM's KV-arithmetic experiment (Table 1 of arXiv 2401.02412) at CPU scale; see README.md."""

from experiments.calm_kv_arithmetic.repro import QUICK, ReproConfig, main, run

__all__ = ["QUICK", "ReproConfig", "main", "run"]
