"""Test-wide set-up: 8 fake CPU devices and glibc allocator tuning, before jax is imported."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from moe_jax.runtime import tune_cpu_allocator  # noqa: E402

tune_cpu_allocator()  # before jax or torch start threads: every step skips ~29k page faults

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
