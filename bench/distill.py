"""Distillation on the generated faces, measured side by side (docs/distill.md).

    python bench/distill.py --out docs/benchmarks/distill.json              # the whole study (an hour or more here)
    python bench/distill.py --teacher runs/default_teacher --seeds 1 2 3    # reuse a trained teacher
    python bench/distill.py --tiny                                          # seconds: what the tests run
    python bench/distill.py --teacher runs/default_teacher --only distilled --distill-weight 10 --no-timing
                                                                            # another weight, the same seeds
    python bench/distill.py --teacher runs/default_teacher --timing-only --steps 60   # the step times alone

1. **A teacher trained longer than the student**: `launch/recipes/default_teacher.yaml` (the default data and
   network, 8 epochs instead of 2, its own seed), unless `--teacher` names one.
2. **The same small student with and without distillation**, from the same seed and for the same step budget (the
   default recipe, 2 epochs; with `distill:` from `launch/recipes/default_distill.yaml`), for each of `--seeds`:
   its verification accuracy on the held-out pairs (`val.bin`, insightface's protocol) and the mean cosine between
   the student's and the teacher's embedding of each held-out image.
3. **Step time** of a student step with distillation, with the cache (after a first epoch filled it) and without
   (the teacher runs every step), as ratios to the plain student step: the three are built as real
   `trainer.loop.Trainer`s in this process and stepped in turn (each step in another order), so a machine shared
   with other jobs slows them alike; the ratio of each step to the plain step of the same round, median and
   quartiles.

Runs go through `python trainer/main.py` (one process, CPU), each in its own output folder under `--scratch`.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/distill.py` puts bench/ first on sys.path, where bench/data.py would shadow the `data` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = _HERE.parent
RECIPES = REPO / "launch" / "recipes"
MAIN = REPO / "trainer" / "main.py"


def train(recipe: Path, out: Path, overrides: list[str], timeout: float) -> dict[str, Any]:
    """`python trainer/main.py --config recipe --output out ...`; the run's last verification accuracy and time."""
    start = time.perf_counter()
    command = [sys.executable, str(MAIN), "--config", str(recipe), "--output", str(out), "--overwrite", *overrides]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val/val" in r]
    return {"seconds": time.perf_counter() - start, "val_acc": val[-1]["val/val"], "steps": records[-1]["step"]}


def val_bin(run: Path) -> Path:
    """The generated dataset's `val.bin` a run evaluated on (its train.log names it)."""
    for line in (run / "train.log").read_text().splitlines():
        if "val.bin" in line:
            return Path(next(word for word in line.split() if word.endswith("val.bin")))
    raise SystemExit(f"{run}/train.log names no val.bin")


@torch.no_grad()
def mean_cosine(student: Path, teacher: Path, bin_path: Path) -> float:
    """Mean over the held-out images of cos(student embedding, teacher embedding) (same embedding size)."""
    from data.dataset import normalize_images
    from evaluation.verification import load_bin
    from models.weights import load_backbone

    images, _ = load_bin(bin_path)
    models = [load_backbone(path)[0].eval() for path in (student, teacher)]
    cosines = []
    for start in range(0, len(images), 128):
        batch = normalize_images(images[start : start + 128], torch.float32)
        a, b = (F.normalize(model(batch)) for model in models)
        cosines.append((a * b).sum(dim=1))
    return float(torch.cat(cosines).mean())


def step_times(teacher: Path, scratch: Path, steps: int, overrides: list[str]) -> dict[str, Any]:
    """Plain, distilled without the cache, distilled with a full cache: real Trainers stepped in turn."""
    from accelerate import Accelerator

    from trainer.config import load_config
    from trainer.loop import Trainer

    variants = {
        "plain": [],
        "distill, no cache": ["--distill.teacher", str(teacher)],
        "distill, cache": ["--distill.teacher", str(teacher), "--distill.cache", "true"],
    }
    accelerator = Accelerator(cpu=True)
    trainers: dict[str, Trainer] = {}
    for name, extra in variants.items():
        cfg = load_config(RECIPES / "default.yaml", ["--output", str(scratch / name), *overrides, *extra])
        trainers[name] = Trainer(cfg, accelerator)
    cache = trainers["distill, cache"]
    # Fill the cache as the first epoch does (every sample both ways round), then read it back from its shards.
    first_epoch = cache.input.batches(0)
    for position, batch in enumerate(first_epoch):
        images, labels, bad = cache.input.to_device(batch, torch.float32)
        samples = cache.input.batch_samples(0, position * len(labels), len(labels))
        assert cache.distill is not None
        cache.distill.teacher_embeddings(images, samples, clean=True)
    assert cache.distill is not None and cache.distill.cache is not None
    cache.distill.cache.flush()
    streams = {name: trainer.input.batches(1) for name, trainer in trainers.items()}
    for trainer in trainers.values():
        trainer.state.epoch = 1
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    names = list(trainers)
    for step in range(steps + 2):
        for name in names[step % 3 :] + names[: step % 3]:
            trainer = trainers[name]
            images, labels, bad = trainer.input.to_device(next(streams[name]), torch.float32)
            start = time.perf_counter()
            trainer.train_step(images, labels, bad)
            if step >= 2:  # the first two are warm-up
                seconds[name].append(time.perf_counter() - start)
    for trainer in trainers.values():
        trainer.input.close()
    out: dict[str, Any] = {}
    for name in names[1:]:
        ratios = [a / b for a, b in zip(seconds[name], seconds["plain"], strict=True)]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out[name] = {"median": statistics.median(ratios), "q1": q[0], "q3": q[2], "steps": len(ratios)}
    out["plain_step_s_median"] = statistics.median(seconds["plain"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, help="a trained teacher (run folder); default: train one")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="student seeds (default 1 2 3)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant (default 30)")
    parser.add_argument("--scratch", type=Path, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per training run")
    parser.add_argument("--tiny", action="store_true", help="seconds: tiny data, 1 seed, few steps")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--distill-weight", type=float, help="distill.weight of the distilled students (default: the recipe's)"
    )
    parser.add_argument("--only", choices=["plain", "distilled"], help="train only these students (with --teacher)")
    parser.add_argument("--no-timing", action="store_true", help="skip the step-time comparison")
    parser.add_argument("--timing-only", action="store_true", help="only the step-time comparison (with --teacher)")
    args = parser.parse_args(argv)
    if args.timing_only and args.teacher is None:
        parser.error("--timing-only needs --teacher")
    overrides: list[str] = []
    if args.tiny:
        overrides = [
            *("--data.generated.num_identities", "12", "--data.generated.images_per_identity", "8"),
            *("--data.generated.num_val_identities", "6", "--data.generated.num_val_pairs", "40"),
            *("--train.batch_size", "16", "--network.embedding_size", "32", "--data.num_workers", "0"),
            *("--schedule.epochs", "1"),  # teacher and students alike: --tiny checks that it runs, not what it learns
        ]
        args.seeds, args.steps = args.seeds[:1], 3
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="bench-distill-"))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    started = time.time()
    teacher = args.teacher
    result: dict[str, Any] = {"overrides": overrides}
    if teacher is None:
        teacher = scratch / "teacher"
        result["teacher"] = train(RECIPES / "default_teacher.yaml", teacher, overrides, args.timeout)
    bin_path = val_bin(teacher)
    result["teacher_path"] = str(teacher)
    students = []
    for seed in [] if args.timing_only else args.seeds:
        row: dict[str, Any] = {"seed": seed}
        for name, recipe in (("plain", "default.yaml"), ("distilled", "default_distill.yaml")):
            if args.only not in (None, name):
                continue
            weight = [] if args.distill_weight is None else ["--distill.weight", str(args.distill_weight)]
            out = scratch / (f"{name}-{seed}" if not weight else f"{name}-w{args.distill_weight:g}-{seed}")
            extra = ["--train.seed", str(seed), "--distill.teacher", str(teacher), *weight]
            if name == "plain":
                extra = ["--train.seed", str(seed)]
            row[name] = train(RECIPES / recipe, out, overrides + extra, args.timeout)
            row[name]["cos_to_teacher"] = mean_cosine(
                out / "model.safetensors", teacher / "model.safetensors", bin_path
            )
        students.append(row)
        print(json.dumps(row), flush=True)
    result["students"] = students
    result["distill_weight"] = args.distill_weight
    for name in ("plain", "distilled"):
        if args.only not in (None, name) or not students:
            continue
        for metric in ("val_acc", "cos_to_teacher"):
            values = [row[name][metric] for row in students]
            result[f"{name}_{metric}"] = {
                "mean": statistics.mean(values),
                "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
            }
    if not args.no_timing:
        result["step_time"] = step_times(teacher, scratch / "timing", args.steps, overrides)
    from trainer.reporting import machine_info

    result["machine"] = machine_info()
    result["date"] = datetime.date.today().isoformat()
    result["command"] = " ".join(["python", "bench/distill.py", *(argv if argv is not None else sys.argv[1:])])
    result["wall_s"] = time.time() - started
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
