"""Test-only entry point: the trainer with DeepSpeed's fp16 check overridden on this CPU.

DeepSpeed refuses fp16 on CPUs without fp16 kernels ("Type fp16 is not supported on your device"). Its loss
scaling and overflow skipping run fine on CPU, and they are what the tests must exercise, so this wrapper makes the
accelerator claim fp16 support. It lives in tests/ only: the user path never overrides it.
"""

from __future__ import annotations

import sys

from deepspeed.accelerator import get_accelerator

get_accelerator().is_fp16_supported = lambda: True  # type: ignore[method-assign]

from trainer.main import main  # noqa: E402  (after the override, as DeepSpeed reads it at engine creation)

if __name__ == "__main__":
    sys.exit(main())
