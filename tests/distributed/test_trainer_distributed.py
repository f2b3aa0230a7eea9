"""The real trainer across processes on CPU (gloo): DDP, DeepSpeed ZeRO-1/2, two machines on loopback.

Equivalence: same seed, same global batch (the sampler hands rank r entries r, r+W, ... of the shared order, so
one process with batch 2B sees exactly the samples of two processes with batch B), class centers initialised
independently of the number of ranks, BatchNorm frozen (`network.freeze_batchnorm`) so batch statistics do not
depend on how the batch is split. Then the loss trajectory of the first steps must match the one-process run:
tightly in fp32 (DDP, two machines), within bf16 rounding for DeepSpeed's bf16 engines.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from heads import PartialFC, PartialFCOptions
from tests.launching import CONFIGS, MAIN, REPO, TINY, command, env_for, free_port, launch, losses

pytestmark = [pytest.mark.dist, pytest.mark.tier2]

STEPS = 6
EQUIV = [
    "--config",
    str(TINY),
    "--network.freeze_batchnorm",
    "true",
    "--schedule.max_steps",
    str(STEPS),
    "--train.save_every",
    "0",
    "--eval.every",
    "0",
]


def _ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stdout[-2500:] + proc.stderr[-2500:]


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, face_cache: Path) -> list[float]:
    out = tmp_path_factory.mktemp("single")
    _ok(launch([*EQUIV, "--output", str(out), "--train.batch_size", "16"], face_cache))
    return losses(out)


def test_ddp_two_processes_match_one(
    single: list[float], tmp_path: Path, face_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The trainer runs as `__main__` under a probe that records, at interpreter exit, the gloo threads each rank
    # still has: none, so gloo is not torn down during the interpreter's finalization (docs/testing.md).
    probe = tmp_path / "probe"
    probe.mkdir()
    monkeypatch.setenv("GLOO_EXIT_PROBE", str(probe))
    run = tmp_path / "run"
    proc = launch(
        [*EQUIV, "--output", str(run), "--train.batch_size", "8"],
        face_cache,
        config="cpu_ddp_2proc",
        script=REPO / "tests" / "distributed" / "gloo_exit_probe.py",
    )
    _ok(proc)
    assert [(probe / f"rank{rank}.txt").read_text() for rank in (0, 1)] == ["\n", "\n"]
    assert "2 processes" in proc.stdout
    assert len(single) == STEPS and single[-1] < single[0]
    assert losses(run) == pytest.approx(single, rel=1e-4)
    # Each rank wrote its own class-center shard: 12 classes as 6 + 6.
    last = run / "checkpoints" / f"step-{STEPS:08d}"
    shards = [load_file(str(last / f"head-rank{r:05d}-of-00002.safetensors"))["weight"] for r in (0, 1)]
    assert [s.shape[0] for s in shards] == [6, 6]


def test_ddp_lazy_head_update_trains_as_dense(tmp_path: Path, face_cache: Path) -> None:
    """2 processes, half of each rank's centers sampled: head.update lazy (the default) takes dense's steps; the
    exact equality is tests/distributed/test_row_update_dist.py's (float64), here fp32 rounding apart."""
    runs = {}
    for update in ("dense", "lazy"):
        out = tmp_path / update
        args = [*EQUIV, "--output", str(out), "--train.batch_size", "8", "--head.sample_rate", "0.5"]
        _ok(launch([*args, "--head.update", update, "--head.lazy_sync_every", "4"], face_cache, config="cpu_ddp_2proc"))
        runs[update] = losses(out)
    assert len(runs["dense"]) == STEPS and runs["lazy"] == pytest.approx(runs["dense"], rel=1e-3)


def test_ddp_speed_choices_match_one_process(single: list[float], tmp_path: Path, face_cache: Path) -> None:
    """fp16-compressed all-reduce in 1 MiB buckets, gradients as bucket views: the same run to fp16 rounding of the
    gradients (measured ~1e-6 relative over 6 steps)."""
    speed = ["--speed.ddp_comm_hook", "fp16", "--speed.ddp_bucket_cap_mb", "1"]
    speed += ["--speed.ddp_gradient_as_bucket_view", "true"]
    proc = launch([*EQUIV, "--output", str(tmp_path), "--train.batch_size", "8", *speed], face_cache, "cpu_ddp_2proc")
    _ok(proc)
    assert "DDP buckets 1 MiB, comm hook fp16, gradient as bucket view on" in (tmp_path / "train.log").read_text()
    assert losses(tmp_path) == pytest.approx(single, rel=1e-4)


def test_ddp_power_sgd_compresses_after_its_warmup(single: list[float], tmp_path: Path, face_cache: Path) -> None:
    """PowerSGD, rank 4, after 2 plain all-reduce steps: steps 1-2 are the exact run, so the losses of steps 1-3
    (taken before step 3's update) match it; from step 4 on the low-rank gradients show, within 1e-2."""
    speed = ["--speed.ddp_comm_hook", "power_sgd", "--speed.ddp_power_sgd_rank", "4"]
    speed += ["--speed.ddp_power_sgd_warmup_steps", "2"]
    proc = launch([*EQUIV, "--output", str(tmp_path), "--train.batch_size", "8", *speed], face_cache, "cpu_ddp_2proc")
    _ok(proc)
    assert "comm hook power_sgd (rank 4, after 2 plain steps)" in (tmp_path / "train.log").read_text()
    compressed = losses(tmp_path)
    assert compressed[:3] == pytest.approx(single[:3], rel=1e-4)
    assert compressed != pytest.approx(single, rel=1e-4)  # it did compress
    assert compressed == pytest.approx(single, rel=1e-2)


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_matches_one_process(stage: int, single: list[float], tmp_path: Path, face_cache: Path) -> None:
    proc = launch(
        [*EQUIV, "--output", str(tmp_path), "--train.batch_size", "8"], face_cache, config=f"cpu_ds_zero{stage}_bf16"
    )
    _ok(proc)
    assert "precision bf16" in proc.stdout
    # bf16 engine weights and activations: the trajectory follows fp32 within bf16 rounding.
    assert losses(tmp_path) == pytest.approx(single, rel=3e-2)
    last = tmp_path / "checkpoints" / f"step-{STEPS:08d}"
    assert (last / "deepspeed").is_dir()
    # model.safetensors holds the fp32 master weights, not the bf16 copies.
    assert {t.dtype for k, t in load_file(str(tmp_path / "model.safetensors")).items() if t.is_floating_point()} == {
        torch.float32
    }


def test_two_machines_on_loopback_match_one(single: list[float], tmp_path: Path, face_cache: Path) -> None:
    """Two `accelerate launch` invocations, machine_rank 0 and 1, one process each, through Accelerate's launcher."""
    port = str(free_port())
    args = [*EQUIV, "--output", str(tmp_path), "--train.batch_size", "8"]
    procs = [
        subprocess.Popen(
            command(args, CONFIGS / f"cpu_2machines_rank{rank}.yaml", MAIN, ["--main_process_port", port]),
            cwd=REPO,
            env=env_for(face_cache, threads=1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-2000:] + err[-2000:]
    assert "2 processes" in outputs[0][0]
    assert losses(tmp_path) == pytest.approx(single, rel=1e-4)


def test_deepspeed_fp16_skips_overflow_for_head_and_backbone(tmp_path: Path, face_cache: Path) -> None:
    """fp16 ZeRO-2 with real dynamic loss scaling (test-only fp16 override on this CPU): the first steps overflow
    at scale 2^16 and are skipped; the head must not move on a skipped step either (half the centers sampled,
    head.update lazy: the head's own RowSGD beside the engine)."""
    proc = launch(
        [
            "--config",
            str(TINY),
            "--output",
            str(tmp_path),
            "--train.batch_size",
            "8",
            "--schedule.max_steps",
            "4",
            "--train.save_every",
            "1",
            "--eval.every",
            "0",
            "--head.sample_rate",
            "0.5",
        ],
        face_cache,
        config=str(CONFIGS / "cpu_ds_zero2_bf16.yaml").replace("bf16.yaml", "bf16.yaml"),
        script=REPO / "tests" / "distributed" / "ds_fp16_entry.py",
        launcher=[
            "--main_process_port",
            str(free_port()),
            "--deepspeed_config_file",
            str(REPO / "ds_configs" / "zero2_fp16.json"),
        ],
    )
    _ok(proc)
    state = json.loads((tmp_path / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["skipped_steps"] >= 1, state
    first_skipped = state["skipped_at"][0]
    # After a skipped first step the head is exactly its (rank-count independent) initial value.
    if first_skipped == 1:
        for rank in (0, 1):
            shard = load_file(
                str(tmp_path / "checkpoints" / "step-00000001" / f"head-rank{rank:05d}-of-00002.safetensors")
            )
            head = PartialFC(PartialFCOptions(32, 12, rank=rank, world_size=2))
            head.reset_parameters(seed=2048)
            assert torch.equal(shard["weight"], head.weight.detach()), rank
    assert all(loss == loss for loss in losses(tmp_path))  # no NaN reached the logged losses


def test_deepspeed_config_quirk_ranks(face_cache: Path) -> None:
    """Under a DeepSpeed config on CPU a plain Accelerator() says 'process 0 of 1' on every rank; ours does not."""
    seen = {}
    for which in ("plain", "ours"):
        proc = launch(
            [which], face_cache, config="cpu_ds_zero2_bf16", script=REPO / "tests" / "distributed" / "probe_ranks.py"
        )
        _ok(proc)
        # Both ranks print to one pipe: their lines may interleave, so match the records, not the lines.
        seen[which] = sorted(re.findall(rf"{which} rank=\d+ world=\d+ env_world=\d+", proc.stdout))
    assert seen["plain"] == ["plain rank=0 world=1 env_world=2"] * 2
    assert seen["ours"] == ["ours rank=0 world=2 env_world=2", "ours rank=1 world=2 env_world=2"]


def test_fp16_on_cpu_is_reported_as_fp32(tmp_path: Path, face_cache: Path) -> None:
    config = tmp_path / "cpu_fp16.yaml"
    config.write_text((CONFIGS / "cpu.yaml").read_text().replace("mixed_precision: 'no'", "mixed_precision: fp16"))
    proc = launch(
        ["--config", str(TINY), "--output", str(tmp_path / "run"), "--schedule.max_steps", "1", "--eval.every", "0"],
        face_cache,
        config=str(config),
    )
    _ok(proc)
    assert "Accelerate runs fp16 as fp32 on a CPU" in proc.stdout + proc.stderr
    assert "fp32 (fp16 requested; ignored on CPU)" in proc.stdout


def test_deepspeed_fp16_runs_or_is_refused_clearly_on_this_cpu(tmp_path: Path, face_cache: Path) -> None:
    """DeepSpeed takes fp16 on a CPU only where its CPU accelerator has fp16 kernels (AVX512-FP16, as this project's
    2026-12 machine has; the one before had none): there it trains, elsewhere the run stops before step 1 with one
    line pointing to the bf16 configs."""
    from deepspeed.accelerator import get_accelerator

    proc = launch(
        ["--config", str(TINY), "--output", str(tmp_path), "--schedule.max_steps", "2", "--eval.every", "0"],
        face_cache,
        config="cpu_ds_zero2_bf16",
        launcher=[
            "--main_process_port",
            str(free_port()),
            "--deepspeed_config_file",
            str(REPO / "ds_configs" / "zero2_fp16.json"),
        ],
    )
    if get_accelerator().is_fp16_supported():
        _ok(proc)
        assert "precision fp16" in proc.stdout and "step 2/2" in proc.stdout
    else:
        assert proc.returncode != 0
        assert "use a bf16 DeepSpeed config" in proc.stderr
        assert "step 1/" not in proc.stdout


# --- bad input: clear errors before any training step -----------------------------------------------------------


def test_missing_deepspeed_json(tmp_path: Path, face_cache: Path) -> None:
    proc = launch(
        ["--config", str(TINY), "--output", str(tmp_path)],
        face_cache,
        config="cpu_ds_zero2_bf16",
        launcher=["--main_process_port", str(free_port()), "--deepspeed_config_file", "ds_configs/nope.json"],
    )
    assert proc.returncode != 0
    assert "ds_configs/nope.json" in proc.stderr
    assert "step 1/" not in proc.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--train.global_batch_size", "15"], "train.global_batch_size=15 is not divisible by 2 processes"),
        (
            ["--data.source", "synthetic", "--data.num_classes", "1", "--data.num_images", "64"],
            "data.num_classes=1 is smaller than the 2 processes",
        ),
        # torch's bf16 hook needs NCCL: refused before prepare, naming the key and value.
        (
            ["--speed.ddp_comm_hook", "bf16"],
            "speed.ddp_comm_hook 'bf16' needs the NCCL or XCCL backend (GPUs); this run's is gloo",
        ),
    ],
)
def test_bad_distributed_recipes(extra: list[str], message: str, tmp_path: Path, face_cache: Path) -> None:
    proc = launch(["--config", str(TINY), "--output", str(tmp_path), *extra], face_cache, config="cpu_ddp_2proc")
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "step 1/" not in proc.stdout


def test_channels_last_refused_under_deepspeed(tmp_path: Path, face_cache: Path) -> None:
    """DeepSpeed broadcasts parameters as contiguous bytes: an NHWC weight would fail inside deepspeed.initialize."""
    proc = launch(
        ["--config", str(TINY), "--output", str(tmp_path), "--speed.channels_last", "true"],
        face_cache,
        config="cpu_ds_zero2_bf16",
    )
    assert proc.returncode != 0
    assert "speed.channels_last true is not supported under DeepSpeed" in proc.stderr
    assert "Traceback" not in proc.stderr.split("speed.channels_last")[0]  # the first thing said is the error line
    assert "step 1/" not in proc.stdout


def test_rank_with_another_batch_size(tmp_path: Path, face_cache: Path) -> None:
    """Two machines launched with different recipes: stopped before the first step, naming the key and values."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            command(
                ["--config", str(TINY), "--output", str(tmp_path), "--train.batch_size", str(batch)],
                CONFIGS / f"cpu_2machines_rank{rank}.yaml",
                MAIN,
                ["--main_process_port", port],
            ),
            cwd=REPO,
            env=env_for(face_cache, threads=1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, batch in ((0, 8), (1, 4))
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode != 0 for p in procs)
    err = outputs[0][1]
    assert "train.batch_size differs between ranks (rank 0: 8, rank 1: 4)" in err
    assert "step 1/" not in outputs[0][0]


def test_deepspeed_gradient_accumulation_matches_one_process(
    single: list[float], tmp_path: Path, face_cache: Path
) -> None:
    """ZeRO-2, 2 ranks x batch 4 x 2 accumulation steps = the 1-process global batch of 16: the head's gradients,
    divided by the engine's accumulation, must be the mean over the group as the backbone's are."""
    proc = launch(
        [*EQUIV, "--output", str(tmp_path), "--train.batch_size", "4", "--train.gradient_accumulation_steps", "2"],
        face_cache,
        config="cpu_ds_zero2_bf16",
    )
    _ok(proc)
    # Rank r's two micro-batches hold global entries r, r+2, ..., r+14: over both ranks exactly the 16 samples of
    # the one-process step, and the logged loss is the mean of the two micro-batch losses.
    assert losses(tmp_path) == pytest.approx(single, rel=3e-2)


def test_zero3_is_refused_at_start(tmp_path: Path, face_cache: Path) -> None:
    ds = tmp_path / "zero3.json"
    ds.write_text((REPO / "ds_configs" / "zero2_bf16.json").read_text().replace('"stage": 2', '"stage": 3'))
    proc = launch(
        ["--config", str(TINY), "--output", str(tmp_path / "run")],
        face_cache,
        config="cpu_ds_zero2_bf16",
        launcher=["--main_process_port", str(free_port()), "--deepspeed_config_file", str(ds)],
    )
    assert proc.returncode != 0
    assert "DeepSpeed ZeRO-3 is not supported" in proc.stderr
    assert "step 1/" not in proc.stdout
