"""The training benchmarks (train_step, speed, head_scaling, gpu_bench, plot) in their `--tiny` modes: every field the
docs and the plot read is there and consistent. Figures depend on the machine: no timing is asserted. The tests that
run a script are in the second tier (docs/testing.md); gpu_bench's choice of configurations is checked in the fast
tier, on a fake clock."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

from models import build_backbone, count_flops

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(script: str, folder: Path, *args: str, out: str | None = None) -> dict[str, Any]:
    """Run ``bench/<script>`` from ``folder`` (as a user would, outside the project) and read its JSON."""
    out_path = folder / (out or f"{Path(script).stem}.json")
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--out", str(out_path)],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out_path.read_text())


def _load(script: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{Path(script).stem}", BENCH / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-train")


@pytest.fixture(scope="module")
def train_step(folder: Path) -> dict[str, Any]:
    # Every operator whose call count differs is listed (not only the 15 costliest), so the test can look one up.
    return _run("train_step.py", folder, "--tiny", "--profile", "--profile-top", "1000")


@pytest.fixture(scope="module")
def speed(folder: Path) -> dict[str, Any]:
    return _run("speed.py", folder, "--tiny")


@pytest.fixture(scope="module")
def head_scaling(folder: Path) -> dict[str, Any]:
    return _run("head_scaling.py", folder, "--tiny", "--count-bytes", "--paired", "2", "--fit-network", "r_lite")


@pytest.fixture(scope="module")
def gpu_bench(folder: Path) -> dict[str, Any]:
    # --budget-s: no overall time bound, so a busy machine skips no eager or Partial FC configuration. --tiny's
    # compile budget (1 s) still decides which compiled configurations run: that depends on the machine.
    return _run("gpu_bench.py", folder, "--tiny", "--peak-tflops", "2.0", "--budget-s", "1e9")


# ----------------------------------------------------------------------------------------------------------------
# train_step.py


@pytest.mark.tier2
def test_train_step_reports_bare_step_and_loop_per_precision(train_step: dict[str, Any]) -> None:
    rows = train_step["results"]
    assert [(row["network"], row["precision"]) for row in rows] == [("r_lite", "fp32"), ("r_lite", "bf16")]
    assert [row["effective_precision"] for row in rows] == ["fp32", "bf16"]
    for row in rows:
        for part in ("bare", "trainer_step", "trainer_loop"):
            timing = row[part]
            assert timing["samples_per_s"] == pytest.approx(row["batch_size"] / timing["step_s_median"])
            assert 0 < timing["step_s_min"] <= timing["step_s_median"]
        for part in ("step", "loop"):
            overhead = row["overhead"][part]
            assert set(overhead) == {"median", "median_s", "q1", "q3", "of_medians"}
            assert overhead["q1"] <= overhead["median"] <= overhead["q3"]
        assert row["within_target"] == (row["overhead"]["step"]["median"] <= train_step["target_overhead"])
        assert row["timed_steps"] == 1 and row["warmup_steps"] == 1
        # The same backbone the trainer built (r_lite, 64-d in --tiny), counted independently here.
        assert row["forward_macs_per_sample"] == count_flops(build_backbone("r_lite", num_features=64))
    assert "--tiny" in train_step["command"] and train_step["machine"]["cpu_model"]


@pytest.mark.tier2
def test_train_step_profile_finds_the_trainers_extra_work(train_step: dict[str, Any]) -> None:
    extra = {row["op"]: row for row in train_step["results"][0]["profile"]["extra_ops"]}
    # Both steps drop their gradients (set_to_none=True): no zeroing pass is extra work of the trainer's.
    assert "aten::zero_" not in extra or extra["aten::zero_"]["calls_trainer"] <= extra["aten::zero_"]["calls_bare"]
    # The divergence guard copies the backbone's BatchNorm buffers before each step (to put them back after a
    # non-finite one); the bare step has no such copies.
    assert extra["aten::clone"]["calls_trainer"] > extra["aten::clone"]["calls_bare"]


# ----------------------------------------------------------------------------------------------------------------
# speed.py


@pytest.mark.tier2
def test_speed_measures_each_switch_against_the_default(speed: dict[str, Any]) -> None:
    single = {row["variant"]: row for row in speed["single"]}
    assert list(single) == ["default", "channels_last", "unfused optimizer"]
    assert single["channels_last"]["overrides"] == {"speed.channels_last": True}
    assert single["unfused optimizer"]["overrides"] == {"optim.fused": False}
    ddp = {row["variant"]: row for row in speed["ddp"]}
    assert list(ddp) == ["default (25 MiB, no hook)", "fp16 hook", "bf16 hook"]
    # gloo cannot run torch's bf16 hook: the trainer refuses it before the first step, and the bench says so.
    assert ddp["bf16 hook"]["status"].startswith("refused: speed.ddp_comm_hook 'bf16' needs the NCCL or XCCL backend")
    measured = [row for row in speed["single"] + speed["ddp"] if row["status"] == "ok"]
    assert len(measured) == 5
    for row in measured:
        assert row["processes"] == (2 if row in speed["ddp"] else 1) and row["precision"] == "fp32"
        assert len(row["step_s"]) == 1 and row["step_s_median"] == row["step_s"][0]
        # --tiny: batch 16 per process; samples/s counts every process's samples.
        assert row["samples_per_s"] == pytest.approx(16 * row["processes"] / row["step_s_median"])
        assert row["speedup"]["q1"] <= row["speedup"]["median"] <= row["speedup"]["q3"]
    # The baselines are their own reference; every other row is paired with its part's baseline, step by step.
    assert single["default"]["speedup"]["median"] == ddp["default (25 MiB, no hook)"]["speedup"]["median"] == 1.0
    base = single["default"]["step_s"][0]
    assert single["channels_last"]["speedup"]["median"] == pytest.approx(base / single["channels_last"]["step_s"][0])
    assert speed["machine"]["cpus"] and "--tiny" in speed["command"]


# ----------------------------------------------------------------------------------------------------------------
# head_scaling.py


@pytest.mark.tier2
def test_head_scaling_covers_every_head_and_size(head_scaling: dict[str, Any]) -> None:
    rows = head_scaling["results"]
    seen = {(row["head"], row["sample_rate"], row["update"], row["num_classes"]) for row in rows}
    heads = [("partial_fc", 1.0, "dense")] + [("partial_fc", 0.1, u) for u in ("dense", "lazy", "sparse")]
    assert seen == {(*head, classes) for classes in (1000, 4000) for head in [*heads, ("full_fc", 1.0, "dense")]}
    assert head_scaling["minimum_bytes_per_class"] == 32 * 4 * 2  # --tiny: 32-d, fp32 center + momentum
    for row in rows:
        minimum = row["num_classes"] * head_scaling["minimum_bytes_per_class"]
        assert row["peak_vs_minimum"] == pytest.approx(row["peak_bytes"] / minimum)
        assert row["samples_per_s"] == pytest.approx(row["batch_size"] / row["step_s_median"])
    # Bytes moved (a count, not a timing): the head optimizer's step follows the sampled rows in lazy and sparse.
    by_update = {row["update"]: row for row in rows if row["sample_rate"] == 0.1 and row["num_classes"] == 4000}
    assert 0 < by_update["sparse"]["optimizer_bytes_per_step"] < by_update["dense"]["optimizer_bytes_per_step"] / 2
    assert by_update["sparse"]["optimizer_bytes_per_step"] < by_update["lazy"]["optimizer_bytes_per_step"]
    assert by_update["lazy"]["optimizer_bytes_per_step"] < by_update["dense"]["optimizer_bytes_per_step"] / 2
    paired = head_scaling["paired"]
    assert [(p["num_classes"], p["a"], p["b"]) for p in paired] == [
        (classes, a, b)
        for classes in (1000, 4000)
        for a, b in (
            ("Partial FC 1", "full FC"),
            ("Partial FC 0.1 lazy", "Partial FC 0.1 dense"),
            ("Partial FC 0.1 sparse", "Partial FC 0.1 dense"),
        )
    ]
    assert all(p["ratio_median"] > 0 and p["pairs"] == 2 for p in paired)
    fit = head_scaling["fit"]
    assert fit["network"] == "r_lite" and fit["backbone"]["bytes"] > 0


@pytest.mark.tier2
def test_head_scaling_isolated_peak_counts_the_kept_tensors(folder: Path) -> None:
    """In its own process, head.update dense's peak must hold at least centers + momentum + the kept gradient + SGD's
    weight-decay temporary (4 center-sized tensors), and what stays after the steps at least the first three; lazy
    keeps centers + momentum and no center-sized gradient."""
    results = _run(
        "head_scaling.py",
        folder,
        "--classes",
        "50000",
        "--sample-rates",
        "0.1",
        "--no-full-fc",
        "--updates",
        "dense",
        "lazy",
        "--embedding-size",
        "64",
        "--batch-size",
        "8",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--threads",
        "1",
        out="isolated.json",
    )
    assert results["isolated"]
    dense, lazy = results["results"]
    assert (dense["update"], lazy["update"]) == ("dense", "lazy")
    center_bytes = 50000 * 64 * 4
    if dense["memory_method"].startswith("VmHWM"):
        assert dense["peak_bytes"] >= 3.9 * center_bytes
        # No center-sized gradient (at this small size the chunks and the allocator are a large part of the rest).
        assert 1.9 * center_bytes <= lazy["peak_bytes"] <= dense["peak_bytes"] - 0.7 * center_bytes
    assert dense["resident_after_bytes"] >= 2.9 * center_bytes
    assert lazy["resident_after_bytes"] >= 1.9 * center_bytes
    assert lazy["sync_s"] > 0  # its full catch-up was timed and amortized


@pytest.mark.tier2
def test_head_scaling_skips_what_would_not_fit(folder: Path) -> None:
    results = _run(
        "head_scaling.py",
        folder,
        "--classes",
        "10000000000",
        "--sample-rates",
        "0.1",
        "--no-full-fc",
        "--updates",
        "lazy",
        "--in-process",
        out="huge.json",
    )
    (row,) = results["results"]
    assert row["skipped"].startswith("skipped: needs ~") and "step_s_median" not in row


# ----------------------------------------------------------------------------------------------------------------
# gpu_bench.py


@pytest.mark.tier2
def test_gpu_bench_tiny_runs_eager_compiled_and_partial_fc(gpu_bench: dict[str, Any]) -> None:
    rows = gpu_bench["backbones"]
    eager = [row for row in rows if not row["compile"]]
    compiled = [row for row in rows if row["compile"]]
    assert {(row["precision"], row["channels_last"]) for row in eager} == {
        (precision, channels_last) for precision in ("bf16", "fp16") for channels_last in (False, True)
    }
    assert all(row["status"] == "ok" for row in eager)
    # The compiled configurations by priority (bf16 and channels_last first); which of them fit --tiny's 1 s compile
    # budget depends on the machine, so each one either ran or says why not (the fake clock below checks the choice).
    assert [(row["precision"], row["channels_last"]) for row in compiled] == [
        ("bf16", True),
        ("bf16", False),
        ("fp16", True),
        ("fp16", False),
    ]
    ran = [row for row in compiled if row["status"] == "ok"]
    skipped = [row for row in compiled if row["status"] != "ok"]
    assert all(row["status"].startswith("skipped: needs ~") and "step_s" not in row for row in skipped)
    macs = count_flops(build_backbone("r_lite", num_features=64))
    for row in eager + ran:
        assert row["forward_macs_per_sample"] == macs
        assert row["train_flops_per_sample"] == macs * 2 * 3
        assert row["mfu"] == pytest.approx(row["samples_per_s"] * macs * 6 / 2.0e12)
    pfc = gpu_bench["partial_fc"]
    assert [(row["num_classes"], row["update"]) for row in pfc] == [
        (classes, update) for classes in (1000, 10_000) for update in ("lazy", "dense", "sparse")
    ]
    assert all(row["status"] == "ok" and row["step_s"] > 0 for row in pfc)
    assert all(row["sync_s"] > 0 for row in pfc if row["update"] == "lazy")  # amortized into step_s
    assert all(row["center_bytes"] == row["num_classes"] * 64 * 4 for row in pfc)


@pytest.mark.parametrize(
    ("budget_s", "partial_fc", "compiled"),
    [
        # 4 eager (1 s each) and 2 Partial FC (2 s each) end at 8 s; the compile budget, 50 s from there, fits the
        # first compiled configuration (guessed 30.4 s, took 30 s); the next ones are guessed from it (29.5 s per
        # network + 2 steps) and would not fit the 20 s left.
        (100, ["ok", "ok"], ["ok"] + ["skipped: needs ~30 s, 20 s left"] * 3),
        # The run's own bound: the second Partial FC (guessed 20 s) would not fit the 19 s left at 6 s, nor would
        # any compiled configuration.
        (25, ["ok", "skipped: needs ~20 s, 19 s left"], ["skipped: needs ~30 s, 19 s left"] * 4),
    ],
)
def test_gpu_bench_runs_what_fits_the_time_left_and_skips_the_rest(
    monkeypatch: pytest.MonkeyPatch, budget_s: int, partial_fc: list[str], compiled: list[str]
) -> None:
    """gpu_bench's choice of what to run, on a fake clock: each configuration costs a set number of seconds, so what
    runs and what is skipped (and the time it says it would need) follows from the budgets alone."""
    gpu_bench = _load("gpu_bench.py")
    now = [0.0]
    monkeypatch.setattr(gpu_bench, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def run_backbone(config: dict[str, Any], args: Any, device: torch.device) -> dict[str, Any]:
        now[0] += 30.0 if config["compile"] else 1.0
        return {**config, "warmup_s": 29.5 if config["compile"] else 0.5, "step_s": 0.2}

    def run_partial_fc(config: dict[str, Any], args: Any, device: torch.device) -> dict[str, Any]:
        now[0] += 2.0
        return {**config, "step_s": 0.5}

    monkeypatch.setattr(gpu_bench, "run_backbone", run_backbone)
    monkeypatch.setattr(gpu_bench, "run_partial_fc", run_partial_fc)
    args = gpu_bench.build_parser().parse_args(
        [
            "--networks",
            "r_lite",
            "--warmup",
            "1",
            "--steps",
            "1",
            "--pfc-classes",
            "1000",
            "--pfc-updates",
            "lazy",
            "dense",
            "--budget-s",
            str(budget_s),
            "--compile-budget-s",
            "50",
            "--compile-guess-s",
            "30",
        ]
    )
    args.device_name = "cpu"
    results = gpu_bench.run(args, torch.device("cpu"), lambda _: None)
    backbones = results["backbones"]
    assert [row["status"] for row in backbones if not row["compile"]] == ["ok"] * 4
    assert [row["status"] for row in results["partial_fc"]] == partial_fc
    assert [row["status"] for row in backbones if row["compile"]] == compiled


def test_gpu_peak_table_by_device_name() -> None:
    gpu_bench = _load("gpu_bench.py")
    assert gpu_bench.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert gpu_bench.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert gpu_bench.peak_tflops("NVIDIA H200", None) == 989.0
    assert gpu_bench.peak_tflops("NVIDIA A100-SXM4-80GB", None) == 312.0
    assert gpu_bench.peak_tflops("NVIDIA GeForce GTX 1080", None) is None
    assert gpu_bench.peak_tflops("NVIDIA A100-SXM4-80GB", 100.0) == 100.0


# ----------------------------------------------------------------------------------------------------------------
# plot.py


@pytest.mark.tier2
def test_plot_draws_head_scaling_results(folder: Path, head_scaling: dict[str, Any]) -> None:
    png = folder / "scaling.png"
    summary = _run("plot.py", folder, str(folder / "head_scaling.json"), "--png", str(png), out="plot.json")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(summary["series"]) == {
        "Partial FC, sample rate 1",
        "full FC (Linear + CE)",
        *(f"Partial FC, sample rate 0.1, {update}" for update in ("dense", "lazy", "sparse")),
    }
    for points in summary["series"].values():
        assert [point["num_classes"] for point in points] == [1000, 4000]
    assert summary["left_out"] == []


@pytest.mark.tier2
def test_plot_tiny_writes_a_png_beside_its_json(folder: Path) -> None:
    summary = _run("plot.py", folder, "--tiny", out="plot-tiny.json")
    assert Path(summary["png"]).read_bytes()[:4] == b"\x89PNG"
    assert len(summary["left_out"]) == 1


@pytest.mark.tier2
@pytest.mark.parametrize("script", ["train_step.py", "speed.py", "head_scaling.py", "gpu_bench.py", "plot.py"])
def test_help(script: str) -> None:
    proc = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--tiny" in proc.stdout and "--out" in proc.stdout
