"""Paper reproductions built on the public API of moe_jax and calm_jax (not installed).

Run from the repository root: ``python -m experiments.calm_kv_arithmetic``,
``python -m experiments.peft_sweep``, ``python -m experiments.bam_vs_btx``.
"""
