"""moe_jax.runtime: the glibc allocator tuning and when it stays off."""

import subprocess
import sys

import pytest

from moe_jax import runtime


def test_conftest_applied_the_tuning_on_linux_glibc():
  if runtime._skip_reason() is not None or runtime._libc() is None:
    pytest.skip("not Linux/glibc, or the environment opts out")
  assert runtime.tune_cpu_allocator() is True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
@pytest.mark.parametrize("name,value,named", [
    ("MOE_JAX_MALLOC_TUNING", "0", "MOE_JAX_MALLOC_TUNING"),
    ("GLIBC_TUNABLES", "glibc.malloc.arena_max=2", "GLIBC_TUNABLES"),
    ("MALLOC_ARENA_MAX", "4", "MALLOC_ARENA_MAX"),
    ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "jemalloc"),
])
def test_user_choices_turn_the_tuning_off(monkeypatch, name, value, named):
  for var in runtime._USER_ALLOCATOR_ENV + ("LD_PRELOAD", "MOE_JAX_MALLOC_TUNING"):
    monkeypatch.delenv(var, raising=False)
  assert runtime._skip_reason() is None
  monkeypatch.setenv(name, value)
  assert named in runtime._skip_reason()


def test_importing_the_library_changes_no_process_state():
  code = ("import moe_jax, moe_jax.api, moe_jax.train, moe_jax.models.decoder, moe_jax.peft\n"
          "import moe_jax.runtime as r\n"
          "print(r._applied)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == "None"
