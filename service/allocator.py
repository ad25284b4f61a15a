"""glibc malloc settings for the workers, applied in gunicorn's master before it forks them.

Why: a worker runs ~70 threads (gunicorn's request threads, BLAS and torch pools). With glibc's
defaults each thread that allocates may get an arena of its own (up to 8 per core), and freed
blocks of variable size (prefill windows, score windows, batches of rows) stay scattered over
them, so a worker's RSS climbs for hours without any object leaking. Measured side by side
(`python -m bench.soak --minutes 12 --warmup 3 --clients 4 --workers 1`, one run with
`--env MALLOC_TUNING=false`, both at once while a training run used the cores: memory, not
speed, was compared; bench/results/soak-ab-*.json): with glibc's defaults the worker's
RSS floor was 587 MB after warm-up (and rose 575 -> 605 MB in an earlier pair of runs); with
these settings 385 MB, flat to within 1 MB, the large buffers of a request handed back to the
kernel when it ends.

- two arenas: threads share them instead of each dirtying its own;
- a fixed mmap threshold: blocks of 256 KiB and more are mapped and unmapped per allocation
  (glibc otherwise raises the threshold after the first large free, and large buffers then
  come from the arenas and fragment them);
- trim the top of the heap once 1 MiB is free there.

MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or GLIBC_TUNABLES in the
environment win: then nothing is changed here. Off with MALLOC_TUNING=false. Not glibc (musl,
macOS): nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

SETTINGS = {_M_ARENA_MAX: 2, _M_MMAP_THRESHOLD: 256 * 1024, _M_TRIM_THRESHOLD: 1024 * 1024}
_OWN_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def tune_malloc() -> str:
    """Apply SETTINGS to this process's glibc malloc (inherited by children forked afterwards);
    returns what was done, for the log."""
    if any(name in os.environ for name in _OWN_ENV):
        return "malloc: left as the environment sets it"
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return "malloc: not glibc, left alone"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not all(mallopt(param, value) == 1 for param, value in SETTINGS.items()):
        return "malloc: this C library refused mallopt, left alone"
    return "malloc: 2 arenas, mmap threshold 256 KiB, trim threshold 1 MiB"
