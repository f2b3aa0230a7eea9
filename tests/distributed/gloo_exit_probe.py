"""Runs trainer/main.py as `accelerate launch` would (as `__main__`), then, at interpreter exit, writes the gloo
threads this rank still runs to `$GLOO_EXIT_PROBE/rank<RANK>.txt` (tests/distributed/test_trainer_distributed.py)."""

from __future__ import annotations

import atexit
import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.launching import gloo_threads  # noqa: E402


def _report() -> None:  # registered first, so it runs after everything the trainer registered, before finalization
    out = Path(os.environ["GLOO_EXIT_PROBE"]) / f"rank{os.environ.get('RANK', '0')}.txt"
    out.write_text(" ".join(gloo_threads()) + "\n")


atexit.register(_report)
sys.argv[0] = str(REPO / "trainer" / "main.py")
runpy.run_path(sys.argv[0], run_name="__main__")
