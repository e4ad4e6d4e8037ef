"""Target-neutral pieces of the CPU backends (x86, arm), each module one job:

* `targets`: the table of CPU targets: per ISA family the triple of its emitted objects, how its hosts are
  recognised, and the micro-architecture levels an artifact carries objects for;
* `threads`: thread count, the Python and spinning pools, row ranges;
* `linears`: `CpuLinears`, the `linear_impl` that runs packed linears through the generated kernels;
* `rows`: one packed matrix as row-lane records, run by one kernel call (the default);
* `segments`: one segment run by its lane-interleaved kernel (`$XBITC_X86_LINEAR=segments`) and `kernel_plan`;
* `emit`: the artifact's `kernels/`: one object per level and activation strategy, and the C header;
* `backend`: `CpuBackend`, a table entry and these pieces as a backend (x86.py and arm.py name their entry).

What they share: reading a `$XBITC_*` choice and logging a fallback once (on the `xbitc.backends.cpu` logger).
"""
from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("xbitc.backends.cpu")
_logged: set = set()


def log_once(key: Any, level: int, msg: str) -> None:
    """Log `msg` the first time `key` is seen in this process (a fallback taken for every matrix is news once)."""
    if key not in _logged:
        _logged.add(key)
        log.log(level, msg)


def env_choice(var: str, choices: tuple[str, ...]) -> str:
    """$var if set (one of `choices`), else the first choice."""
    choice = os.environ.get(var, "").strip() or choices[0]
    if choice not in choices:
        raise ValueError(f"{var}={choice!r}: expected one of {', '.join(choices)}")
    return choice
