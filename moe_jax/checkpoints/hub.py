"""Hugging Face Hub ids as checkpoint paths: ``load_checkpoint("org/name")``.

Every place that takes a checkpoint *path* (``moe_jax.api.load``,
:func:`moe_jax.checkpoints.load_checkpoint`, the CLIs' ``--checkpoint``, gin's
``INIT_CHECKPOINT``) resolves it with :func:`resolve_checkpoint`:

* a local path that exists always wins, so a directory named like a Hub id
  is never shadowed by a download;
* otherwise ``namespace/name`` (optionally ``namespace/name@revision``, or the
  ``revision=`` argument) is fetched by ``huggingface_hub.snapshot_download``:
  its cache (``HF_HUB_CACHE`` / ``HF_HOME``), its offline mode
  (``HF_HUB_OFFLINE=1`` reads the cache only) and its token. Only what a
  checkpoint needs is fetched (:data:`ALLOW_PATTERNS`: configs, tokenizer
  files, safetensors weights), never ``*.bin`` / ``*.pt`` pickles, GGUF or
  ONNX copies of the same weights;
* anything else -- a missing local path that is no Hub id, a repository or
  revision the Hub does not have, a network failure with nothing cached, a
  gated repository -- is a :class:`CheckpointError` naming the id and what to
  do.

Bare names (``gpt2``) are valid Hub ids but are read as local paths: a typo in
a directory name should say "no such directory", not try the network.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from moe_jax.checkpoints.hf_common import CheckpointError

ALLOW_PATTERNS = (
    "config.json", "generation_config.json", "model_config.json", "adapter_config.json",
    "*.safetensors", "*.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "spiece.model",
)

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_-])?"
_HUB_ID = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[^\s@]+))?")


def parse_hub_id(path: str | os.PathLike) -> tuple[str, str | None] | None:
  """``(repo_id, revision or None)`` when ``path`` reads as ``namespace/name[@revision]``."""
  match = _HUB_ID.fullmatch(os.fspath(path))
  if match is None or ".." in match["repo"] or "--" in match["repo"]:
    return None
  return match["repo"], match["revision"]


def resolve_checkpoint(path: str | os.PathLike, *, revision: str | None = None) -> Path:
  """A local directory for ``path``: itself when it exists, else a Hub snapshot.

  Args:
    path: a local path, or a Hub id ``namespace/name`` (``@revision`` optional).
    revision: branch, tag or commit of a Hub id (overrides an ``@revision``).

  Raises:
    CheckpointError: no such local path and not a Hub id, or the Hub (and the
      local cache) cannot provide it; the message names the id.
  """
  local = Path(path)
  if local.exists():
    return local
  parsed = parse_hub_id(path)
  if parsed is None:
    raise CheckpointError(f"{local}: no such checkpoint directory (and not a Hugging Face Hub "
                          "id 'namespace/name')")
  repo_id, rev = parsed
  return Path(download(repo_id, revision=revision or rev))


def download(repo_id: str, *, revision: str | None = None) -> str:
  """``snapshot_download`` of a checkpoint's files; errors become :class:`CheckpointError`."""
  try:
    import huggingface_hub
    from huggingface_hub import errors
  except ImportError:  # pragma: no cover - a declared dependency
    raise CheckpointError(f"{repo_id}: loading a Hugging Face Hub id needs huggingface_hub "
                          "(pip install huggingface_hub)") from None
  what = repo_id + (f" (revision {revision!r})" if revision else "")
  try:
    return huggingface_hub.snapshot_download(repo_id, revision=revision,
                                             allow_patterns=list(ALLOW_PATTERNS))
  except errors.GatedRepoError:
    raise CheckpointError(f"{what}: gated repository on the Hugging Face Hub; accept its "
                          "license on the Hub and log in (hf auth login / HF_TOKEN)") from None
  except errors.RepositoryNotFoundError:
    raise CheckpointError(f"{what}: no such repository on the Hugging Face Hub (or it is "
                          "private: log in with hf auth login / HF_TOKEN)") from None
  except errors.RevisionNotFoundError:
    raise CheckpointError(f"{what}: the Hugging Face Hub repository has no such revision") \
        from None
  except errors.LocalEntryNotFoundError as e:
    offline = huggingface_hub.constants.is_offline_mode()
    why = ("HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
           if offline else "the Hugging Face Hub could not be reached and it is not in the "
           "local cache")
    raise CheckpointError(f"{what}: {why} ({huggingface_hub.constants.HF_HUB_CACHE}); "
                          f"details: {e}") from None
  except Exception as e:  # network (httpx), disk and HTTP errors alike: name the id
    raise CheckpointError(f"{what}: could not fetch from the Hugging Face Hub: "
                          f"{type(e).__name__}: {e}") from None
