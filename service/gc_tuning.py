"""Cyclic garbage collection in a serving process: what start-up built is frozen, and the youngest
generation is collected less often.

CPython's collector runs whenever 700 more container objects have been allocated than freed, and
every tenth of those runs also walks the older generations, which hold everything start-up built
(the app, its routes and schemas, the models' sessions and metadata: ~80,000 objects in an HTTP
worker). Under load, with requests in flight holding their objects, that threshold is crossed every
few requests, although requests make almost no cyclic garbage (every object of an encode is freed
by its reference count), and each full run stops the event loop for 36-52 ms. After `gc.freeze()`
and a threshold of 10,000, no collection ran in 9,600 in-process 1-image encodes, against 36-47 µs
of collections per request (7 full runs) before: 442 vs 514 µs of CPU per request
(benchmarks/request_path_cpu.py); in the server, 674 -> 616 µs per encode at 64 connections and p99
65-72 -> 36-44 ms (benchmarks/cpu_ab.py; docs/benchmarks.md).

`settle()` is called by the process entry points (HTTP workers, the inference process, the
single-process server) once the models are loaded; in-process users (tests, notebooks) keep
Python's defaults. A rescan that replaces models makes the frozen old ones unreachable, and frozen
objects are never collected, so `refreeze()` collects and freezes again after one.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 10_000  # allocations minus deallocations of container objects between two collections

_settled = False


def settle() -> None:
    """Collect once, move every object that survived to the permanent generation, raise the threshold."""
    global _settled
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, older, oldest)
    _settled = True


def refreeze() -> None:
    """After a rescan: what the swap left unreachable among the frozen objects is collected now."""
    if not _settled:
        return
    gc.unfreeze()
    gc.collect()
    gc.freeze()
