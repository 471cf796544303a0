"""How the command-line mains fail: one ``error: ...`` line and a non-zero exit.

A user who mistypes a path or a binding needs the path or binding, not a
300-line traceback (or, for a full disk, 1,600 lines of asyncio noise from
orbax's background writers). :func:`guarded` turns any exception escaping
a main into ``error: <message>`` on stderr and exit status 1; ``--verbose``
(or ``MOE_JAX_VERBOSE=1``) adds the traceback. ``KeyboardInterrupt`` exits
130 quietly. A full disk (``ENOSPC`` anywhere in the exception chain) is
reported as such: orbax writes each step into a temporary directory and
renames it when complete, so the checkpoints saved before stay intact.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
from typing import Callable, Iterator

#: Exit status of a failed run (argument errors exit 2, as argparse does).
EXIT_ERROR = 1


def _chain(e: BaseException) -> Iterator[BaseException]:
  seen = set()
  stack = [e]
  while stack:
    x = stack.pop()
    if x is None or id(x) in seen:
      continue
    seen.add(id(x))
    yield x
    stack += [x.__cause__, x.__context__]
    stack += list(getattr(x, "exceptions", ()))  # ExceptionGroup


def disk_full(e: BaseException) -> OSError | None:
  """The ``ENOSPC`` / ``EDQUOT`` error somewhere in ``e``'s chain, if any."""
  for x in _chain(e):
    if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
      return x
    if "No space left on device" in str(x) or "Disk quota exceeded" in str(x):
      return OSError(errno.ENOSPC, "No space left on device", getattr(x, "filename", None))
  return None


def message(e: BaseException) -> str:
  """The one-line (or few-line) report of ``e``, naming the path where there is one."""
  full = disk_full(e)
  if full is not None:
    where = f" writing {full.filename}" if getattr(full, "filename", None) else ""
    return (f"no space left on device{where}; the checkpoints saved before are kept "
            "(free space and re-run the same command to resume from the last one)")
  if isinstance(e, OSError) and e.filename:
    return f"{e.filename}: {e.strerror or e}"
  text = str(e).strip()
  if isinstance(e, KeyError) and len(e.args) == 1:
    text = str(e.args[0])
  known = ("Error", "Exception")
  name = type(e).__name__
  if not text:
    return name
  if name.endswith(known) and name not in ("ValueError", "CheckpointError", "GinConfigError",
                                          "LockedError", "RuntimeError", "TypeError"):
    return f"{name}: {text}"
  return text


def verbose_requested(argv=None) -> bool:
  argv = sys.argv[1:] if argv is None else argv
  return "--verbose" in argv or os.environ.get("MOE_JAX_VERBOSE", "") not in ("", "0")


def report(e: BaseException, verbose: bool = False) -> int:
  """Prints ``error: ...`` for ``e`` (and its traceback if ``verbose``); the exit status."""
  if isinstance(e, KeyboardInterrupt):
    print("error: interrupted", file=sys.stderr, flush=True)
    return 130
  if verbose:
    traceback.print_exception(e)
  else:
    # orbax's background writers log their own copies of the failure.
    logging.disable(logging.CRITICAL)
  print(f"error: {message(e)}", file=sys.stderr, flush=True)
  return EXIT_ERROR


def guarded(body: Callable[[], int | None], argv=None) -> int:
  """Runs a main's ``body``; any exception becomes :func:`report`'s line and status."""
  try:
    return body() or 0
  except SystemExit as e:  # argparse's --help / usage errors
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    return report(e, verbose_requested(argv))
