"""Data pipelines: seqio vocabularies, tasks and mixtures.

Submodules import seqio and tensorflow (the optional ``data`` extra), so this
package imports nothing itself; import the submodule you need, e.g.
``from moe_jax.data import vocabularies``.
"""
