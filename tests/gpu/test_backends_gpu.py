"""GPU smoke tests: the tiny recipe through every shipped GPU backend config (one GPU; more if present).

Skipped on machines without CUDA. Each run must train (loss falls) and write its model file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.launching import TINY, free_port, launch, losses

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.tier2,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CONFIGS = [
    "single_gpu_bf16",
    "single_gpu_fp16",
    "multi_gpu_bf16",
    "multi_gpu_fp16",
    "deepspeed_zero1_bf16",
    "deepspeed_zero2_bf16",
    "deepspeed_zero1_fp16",
    "deepspeed_zero2_fp16",
]


@pytest.mark.parametrize("config", CONFIGS)
def test_backend_trains(config: str, tmp_path: Path, face_cache: Path) -> None:
    processes = str(max(1, min(torch.cuda.device_count(), 2))) if config.startswith(("multi", "deepspeed")) else "1"
    launcher = ["--num_processes", processes, "--main_process_port", str(free_port())]
    proc = launch(
        ["--config", str(TINY), "--output", str(tmp_path), "--schedule.max_steps", "12", "--data.decode", "cpu"],
        face_cache,
        config=config,
        launcher=launcher,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    history = losses(tmp_path)
    assert history[-1] < history[0]
    assert (tmp_path / "model.safetensors").is_file()
