"""Dense -> MoE parameter surgery: sparse upcycling, BTX and BAM, and router initialisation.

Pure functions over parameter trees (NumPy, on the host), each returning
``(config, params)`` for a registered model kind:

* :func:`sparse_upcycle` -- one dense model, FFN copied into E experts
  (:class:`~moe_jax.models.moe_decoder.MoeDecoder`);
* :func:`btx_merge` -- N domain branches, FFNs as experts, the rest averaged
  (``MoeDecoder``);
* :func:`bam_merge` -- N branches, FFN *and* attention experts, expert-KV or
  shared-KV (:class:`~moe_jax.models.bam_decoder.BamDecoder`);
* :func:`prompt_router_vectors` / :func:`init_routers_from_vectors` --
  mergekit-style router initialisation from positive/negative prompts.

The methods are registered in :mod:`moe_jax.upcycle.methods` (``METHODS``,
``check``, ``upcycle``), which ``python -m moe_jax.upcycle`` (see
:mod:`moe_jax.cli.upcycle`) and ``moe_jax.upcycle_model`` both read.
"""

from moe_jax.upcycle.bam import bam_merge
from moe_jax.upcycle.btx import btx_merge
from moe_jax.upcycle.common import UpcycleError, upcycled_moe_config
from moe_jax.upcycle.router_init import (ExpertPrompts, init_routers_from_vectors,
                                         prompt_router_vectors, router_input_means)
from moe_jax.upcycle.sparse import sparse_upcycle

__all__ = ["ExpertPrompts", "UpcycleError", "bam_merge", "btx_merge", "init_routers_from_vectors",
           "prompt_router_vectors", "router_input_means", "sparse_upcycle",
           "upcycled_moe_config"]
