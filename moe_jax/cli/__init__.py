"""The command line, and the only place gin lives.

* :mod:`configurables` -- gin registration of every configurable, gin file
  parsing with errors naming the file and line, the shared flags, the
  operative-config writer;
* :mod:`train`, :mod:`eval`, :mod:`plan` -- the gin-configured mains of
  ``python -m moe_jax.train / eval / plan`` (over :mod:`moe_jax.train.run`
  and :mod:`moe_jax.plan`);
* :mod:`generate`, :mod:`upcycle` -- the argparse mains of
  ``python -m moe_jax.generate / upcycle``.

The ``python -m`` modules themselves (``moe_jax/train/__main__.py``,
``moe_jax/eval.py``, ...) only call these ``main`` functions, so a main runs
the same code whether it is started with ``-m`` or called from Python.
"""
