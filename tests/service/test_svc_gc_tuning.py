"""service/gc_tuning.py, in a fresh interpreter each (it changes process-wide collector settings)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from service.gc_tuning import GEN0_THRESHOLD


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_settle_freezes_what_start_up_built_and_raises_the_youngest_threshold() -> None:
    out = run_python("""
        import gc
        from service import gc_tuning
        gc_tuning.settle()
        print(gc.get_freeze_count() > 1000, gc.get_threshold()[0], len(gc.get_objects(generation=2)))
    """)
    frozen, threshold, oldest = out.split()
    assert frozen == "True" and int(threshold) == GEN0_THRESHOLD
    assert int(oldest) < 100  # everything that was alive moved to the permanent generation


def test_refreeze_collects_frozen_objects_a_rescan_left_unreachable() -> None:
    out = run_python("""
        import gc, weakref
        from service import gc_tuning

        class Model:  # a model object in a reference cycle, as loaded at start-up
            pass

        gc_tuning.refreeze()  # before settle(): nothing happens
        assert gc.get_freeze_count() == 0
        old = Model(); old.self = old
        gone = weakref.ref(old)
        gc_tuning.settle()
        del old  # the rescan swapped it out: unreachable, but frozen
        gc.collect()
        alive_after_collect = gone() is not None
        gc_tuning.refreeze()
        print(alive_after_collect, gone() is None, gc.get_freeze_count() > 1000)
    """)
    assert out == "True True True"
