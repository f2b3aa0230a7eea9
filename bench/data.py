"""Input-path throughput: images/s of read + decode + flip + normalize + collate through a loader, for 0..N
workers, beside the raw decode speed of the same JPEG bytes in a tight loop.

    python bench/data.py --out bench-data.json            # generates a 112x112 .rec with data.faces
    python bench/data.py --root /data/ms1m --images 0     # an existing .rec
    python bench/data.py --gpu                            # adds nvJPEG decoding (CUDA + torchvision)
    python bench/data.py --tiny                           # seconds: what the test suite runs

Each path is timed over whole epochs after a warm-up epoch. Besides wall-clock images/s, the CPU time of the
processes that load data is read (the main process for 0 workers, the workers' /proc stat otherwise), so the
per-worker ratio "images per CPU-second of loading / raw decodes per CPU-second" holds on a busy machine too.
The dataset's own batch path is also timed alone, in this process (what a worker does before the DataLoader
ships the batch through shared memory). Paths:

* ``float/per-sample``: ``__getitem__`` per image + ``default_collate`` (the plain DataLoader contract).
* ``float/batched``: ``__getitems__`` decodes a batch into one tensor + ``collate_faces`` (no copy), float32 out.
* ``uint8/batched``: the same, uint8 out (4x fewer bytes between processes); normalize on the device.
* ``uint8/FaceLoader``: the same batch path in :class:`data.loader.FaceLoader`'s workers, which decode into
  shared-memory slots allocated once (DataLoader allocates a new segment per batch).
* ``uint8/FaceLoader, flip on device``: what the trainer runs: the workers read and decode, the flip is applied
  with the normalization on the device; that device-side cost is timed apart, per image.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/data.py` puts bench/ first on sys.path, where this file would shadow the `data` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import datetime  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable, Sequence  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import numpy as np  # noqa: E402
import simplejpeg  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from data.dataset import (  # noqa: E402
    IMAGE_SIZE,
    DistributedEpochSampler,
    FaceSample,
    RecordFaceDataset,
    collate_faces,
    normalize_images,
)
from data.faces import FacesConfig, generate  # noqa: E402
from data.loader import FaceLoader  # noqa: E402
from trainer.reporting import machine_info  # noqa: E402

# Wide enough for the tables when the output goes to a file or a pipe (rich would wrap them at 80 columns).
console = Console() if sys.stdout.isatty() else Console(width=130)


def _decoders() -> dict[str, Callable[[bytes], Any]]:
    """Every JPEG decoder importable here, each returning an RGB array."""

    def pillow(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))

    found: dict[str, Callable[[bytes], Any]] = {
        "simplejpeg": lambda data: simplejpeg.decode_jpeg(data, colorspace="RGB"),
        "pillow": pillow,
    }
    try:
        import cv2  # type: ignore[import-not-found]

        cv2.setNumThreads(1)
        flag = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR)  # RGB output from OpenCV 4.10 on
        found["opencv"] = lambda data: cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    except ImportError:
        pass
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG  # type: ignore[import-not-found]

        turbo = TurboJPEG()  # raises without the libturbojpeg system library
        found["pyturbojpeg"] = lambda data: turbo.decode(data, pixel_format=TJPF_RGB)
    except (ImportError, RuntimeError, OSError):
        pass
    return found


def measure_decoders(jpegs: list[bytes], repeats: int) -> dict[str, dict[str, float]]:
    """Best-of-``repeats`` images/s of each decoder over ``jpegs``, by wall clock and by CPU time."""
    results = {}
    for name, decode in _decoders().items():
        wall = cpu = float("inf")
        for _ in range(repeats):
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            for data in jpegs:
                decode(data)
            wall = min(wall, time.perf_counter() - start_wall)
            cpu = min(cpu, time.process_time() - start_cpu)
        results[name] = {"images_per_s": len(jpegs) / wall, "images_per_cpu_s": len(jpegs) / max(cpu, 1e-9)}
    return results


class _PerSample(Dataset[FaceSample]):
    """The dataset without ``__getitems__``: DataLoader then calls ``__getitem__`` per image."""

    def __init__(self, dataset: RecordFaceDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> FaceSample:
        return self.dataset[item]


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, from /proc (None where there is no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _loader_cpu(loader: DataLoader[Any] | FaceLoader) -> float | None:
    if isinstance(loader, FaceLoader):
        workers = loader._workers
    else:  # persistent workers: the iterator (and its worker processes) outlive an epoch
        workers = getattr(loader._iterator, "_workers", None)
    if not workers:
        return time.process_time()
    seconds = [_process_cpu_seconds(worker.pid) for worker in workers]
    return None if any(value is None for value in seconds) else sum(seconds)  # type: ignore[misc]


class LoaderPath(NamedTuple):
    """One way of turning the .rec into batches: DataLoader with a collate function, or FaceLoader."""

    dataset: Dataset[Any]
    collate: Callable[..., Any] | None = None  # DataLoader; None = default_collate
    face_loader: bool = False
    flip_on_device: bool = False  # FaceLoader only: workers read + decode, the flip goes with normalization

    def build(self, sampler: DistributedEpochSampler, workers: int, batch_size: int) -> DataLoader[Any] | FaceLoader:
        if self.face_loader:
            return FaceLoader(
                self.dataset,  # type: ignore[arg-type]
                batch_size,
                sampler,
                num_workers=workers,
                prefetch=4,
                flip_on_device=self.flip_on_device,
            )
        return DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=self.collate,
            drop_last=True,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None,
            multiprocessing_context="fork" if workers else None,
        )


def measure_loader(path: LoaderPath, workers: int, batch_size: int, epochs: int) -> dict[str, float | None]:
    """images/s (wall) and images per CPU-second of the loading processes, over ``epochs`` after a warm-up."""
    sampler = DistributedEpochSampler(len(path.dataset), rank=0, world_size=1, seed=0, with_seeds=True)  # type: ignore[arg-type]
    loader = path.build(sampler, workers, batch_size)
    images = 0
    for epoch in range(epochs + 1):
        sampler.set_epoch(epoch)
        if epoch == 1:  # after the warm-up epoch (worker start, page cache)
            start_wall, start_cpu = time.perf_counter(), _loader_cpu(loader)
        for batch in loader:
            if epoch >= 1:
                images += len(batch[0])
    wall = time.perf_counter() - start_wall
    end_cpu = _loader_cpu(loader)
    cpu = None if start_cpu is None or end_cpu is None else end_cpu - start_cpu
    if isinstance(loader, FaceLoader):
        loader.close()
    del loader  # ends the workers
    return {"images_per_s": images / wall, "images_per_cpu_s": images / cpu if cpu else None}


def measure_dataset(dataset: RecordFaceDataset, batch_size: int, epochs: int) -> dict[str, float]:
    """The dataset's own batch path (``__getitems__`` + ``collate_faces``) in this process, torch single-threaded
    as in a worker, without DataLoader: what a worker does before shipping the batch to the main process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sampler = DistributedEpochSampler(len(dataset), rank=0, world_size=1, seed=0, with_seeds=True)
        items = list(sampler)
        best = float("inf")
        for _ in range(epochs):
            start = time.process_time()
            for first in range(0, len(items) - batch_size + 1, batch_size):
                collate_faces(dataset.__getitems__(items[first : first + batch_size]))
            best = min(best, time.process_time() - start)
    finally:
        torch.set_num_threads(threads)
    images = len(items) // batch_size * batch_size
    return {"images_per_cpu_s": images / max(best, 1e-9)}


def measure_device_side(batch_size: int, device: torch.device, repeats: int = 20) -> dict[str, float]:
    """What the trainer does with a uint8 batch on its device: ``normalize_images`` alone, and with the flips the
    loader left to the device (half the images), in microseconds per image (best of ``repeats``)."""
    generator = torch.Generator().manual_seed(0)
    hwc = torch.randint(0, 256, (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8, generator=generator)
    images = hwc.to(device).permute(0, 3, 1, 2)
    flips = (torch.arange(batch_size) % 2).bool()
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # as the other CPU figures: one core
    results = {}
    try:
        for name, mask in (("normalize", None), ("normalize_and_flip", flips)):
            best = float("inf")
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                normalize_images(images, torch.float32, flips=mask)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
            results[f"{name}_us_per_image"] = best / batch_size * 1e6
    finally:
        torch.set_num_threads(threads)
    return results


def measure_gpu(root: Path, workers: Sequence[int], batch_size: int, epochs: int) -> dict[str, Any]:
    """images/s of reading in workers + nvJPEG decode + flip + normalize on the GPU."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    try:
        import torchvision  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return {"skipped": "torchvision is not installed"}
    from data.gpu_decode import JpegRecordDataset, collate_jpeg, decode_batch

    device = torch.device("cuda")
    dataset = JpegRecordDataset(root)
    results: dict[str, Any] = {}
    for count in workers:
        sampler = DistributedEpochSampler(len(dataset), rank=0, world_size=1, seed=0, with_seeds=True)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=count,
            collate_fn=collate_jpeg,
            drop_last=True,
            persistent_workers=count > 0,
            prefetch_factor=4 if count else None,
        )
        results[str(count)] = _gpu_rate(loader, sampler, epochs, lambda batch: decode_batch(batch, device)[0])
    results["device"] = torch.cuda.get_device_name()
    results["face_loader_pinned"] = measure_face_loader_to_gpu(root, workers, batch_size, epochs, device)
    return results


def measure_face_loader_to_gpu(
    root: Path, workers: Sequence[int], batch_size: int, epochs: int, device: torch.device
) -> dict[str, Any]:
    """The trainer's CPU-decode path on a GPU: FaceLoader with pinned slots and the flip left to the device, each
    batch copied asynchronously and normalized (and flipped) on the GPU; images/s."""
    dataset = RecordFaceDataset(root, output="uint8")
    results: dict[str, Any] = {}
    for count in workers:
        sampler = DistributedEpochSampler(len(dataset), rank=0, world_size=1, seed=0, with_seeds=True)
        loader = FaceLoader(dataset, batch_size, sampler, num_workers=count, pin_memory=True, flip_on_device=True)

        def to_gpu(batch: Any) -> torch.Tensor:
            pixels, _, _, flips = batch
            return normalize_images(pixels.to(device, non_blocking=True), flips=flips.to(device))

        results[str(count)] = _gpu_rate(loader, sampler, epochs, to_gpu)
        loader.close()
    return results


def _gpu_rate(
    loader: Iterable[Any], sampler: DistributedEpochSampler, epochs: int, to_gpu: Callable[[Any], torch.Tensor]
) -> dict[str, float]:
    """images/s of ``to_gpu`` over each batch of ``loader``, for ``epochs`` after a warm-up epoch, synchronized."""
    images = 0
    for epoch in range(epochs + 1):
        sampler.set_epoch(epoch)
        if epoch == 1:
            torch.cuda.synchronize()
            start = time.perf_counter()
        for batch in loader:
            count = len(to_gpu(batch))
            if epoch >= 1:
                images += count
    torch.cuda.synchronize()
    return {"images_per_s": images / (time.perf_counter() - start)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", help="an existing folder with train.rec/train.idx (default: generate one)")
    parser.add_argument("--images", type=int, default=2048, help="images to generate (default 2048)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-workers", type=int, default=os.cpu_count() or 1, help="measure 0..N workers")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per path (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=5, help="passes of the raw decode loop (best is kept)")
    parser.add_argument("--gpu", action="store_true", help="also measure nvJPEG decoding (CUDA + torchvision)")
    parser.add_argument("--tiny", action="store_true", help="a few seconds, for the test suite")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.images, args.batch_size, args.max_workers, args.epochs, args.repeats = 64, 16, 1, 1, 1
    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        if args.root:
            root = Path(args.root)
        else:
            identities = max(1, args.images // 32)
            cfg = FacesConfig(
                num_identities=identities,
                images_per_identity=max(1, args.images // identities),
                num_val_identities=2,
                num_val_pairs=10,
            )
            console.print(f"generating {cfg.num_identities * cfg.images_per_identity} face images ...")
            root = generate(Path(scratch) / "faces", cfg)
        results = run(root, args)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        console.print(f"wrote {args.out}")
    return 0


def run(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    reference = RecordFaceDataset(root)
    jpegs = [reference.encoded(index)[0] for index in range(len(reference))]
    decoders = measure_decoders(jpegs, args.repeats)
    raw = decoders["simplejpeg"]
    paths = {
        "float/per-sample": LoaderPath(_PerSample(RecordFaceDataset(root, output="float"))),
        "float/batched": LoaderPath(RecordFaceDataset(root, output="float"), collate_faces),
        "uint8/batched": LoaderPath(RecordFaceDataset(root, output="uint8"), collate_faces),
        "uint8/FaceLoader": LoaderPath(RecordFaceDataset(root, output="uint8"), face_loader=True),
        "uint8/FaceLoader, flip on device": LoaderPath(
            RecordFaceDataset(root, output="uint8"), face_loader=True, flip_on_device=True
        ),
    }
    in_process = {
        output: measure_dataset(RecordFaceDataset(root, output=output), args.batch_size, args.epochs + 1)  # type: ignore[arg-type]
        for output in ("float", "uint8")
    }
    for values in in_process.values():
        values["cpu_vs_raw"] = values["images_per_cpu_s"] / raw["images_per_cpu_s"]
    workers = list(range(args.max_workers + 1))
    loaders: dict[str, dict[str, Any]] = {}
    for name, path in paths.items():
        loaders[name] = {}
        for count in workers:
            result = measure_loader(path, count, args.batch_size, args.epochs)
            per_worker = result["images_per_s"] / max(count, 1)  # type: ignore[operator]
            result["per_worker_vs_raw"] = per_worker / raw["images_per_s"]
            cpu_rate = result["images_per_cpu_s"]
            result["cpu_vs_raw"] = cpu_rate / raw["images_per_cpu_s"] if cpu_rate else None
            loaders[name][str(count)] = result
            one = loaders[name].get("1")
            result["scaling_vs_1_worker"] = result["images_per_s"] / one["images_per_s"] if one else None
    device_side = {"cpu": measure_device_side(args.batch_size, torch.device("cpu"))}
    if args.gpu and torch.cuda.is_available():
        device_side["cuda"] = measure_device_side(args.batch_size, torch.device("cuda"))
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": {**machine_info(), "simplejpeg": simplejpeg.__version__},
        "command": " ".join(sys.argv),
        "images": len(jpegs),
        "mean_jpeg_bytes": float(np.mean([len(data) for data in jpegs])),
        "batch_size": args.batch_size,
        "raw_decode": decoders,
        "dataset_in_process": in_process,
        "loader": loaders,
        "device_side": device_side,
    }
    if args.gpu:
        gpu_workers = [count for count in workers if count > 0] or [0]
        results["gpu"] = measure_gpu(root, gpu_workers, args.batch_size, args.epochs)
    _print(results)
    return results


def _print(results: dict[str, Any]) -> None:
    title = f"raw JPEG decode, {results['images']} images of ~{results['mean_jpeg_bytes']:.0f} bytes, 1 thread"
    raw = Table(title=title)
    for column in ("decoder", "images/s", "images/CPU-s"):
        raw.add_column(column, justify="right" if column != "decoder" else "left")
    for name, values in results["raw_decode"].items():
        raw.add_row(name, f"{values['images_per_s']:.0f}", f"{values['images_per_cpu_s']:.0f}")
    console.print(raw)
    own = Table(title="the dataset's batch path alone (no DataLoader), 1 thread")
    for column in ("output", "images/CPU-s", "CPU / raw"):
        own.add_column(column, justify="left" if column == "output" else "right")
    for output, values in results["dataset_in_process"].items():
        own.add_row(output, f"{values['images_per_cpu_s']:.0f}", f"{values['cpu_vs_raw']:.0%}")
    console.print(own)
    table = Table(title=f"DataLoader, batch {results['batch_size']} (ratios vs raw simplejpeg decode)")
    for column in ("path", "workers", "images/s", "per worker / raw", "images/CPU-s", "CPU / raw", "vs 1 worker"):
        table.add_column(column, justify="left" if column == "path" else "right")

    def fmt(value: float | None, pattern: str) -> str:
        return "-" if value is None else pattern.format(value)

    for name, by_workers in results["loader"].items():
        for count, values in by_workers.items():
            table.add_row(
                name,
                count,
                f"{values['images_per_s']:.0f}",
                fmt(values["per_worker_vs_raw"], "{:.0%}"),
                fmt(values["images_per_cpu_s"], "{:.0f}"),
                fmt(values["cpu_vs_raw"], "{:.0%}"),
                fmt(values["scaling_vs_1_worker"], "{:.2f}x"),
            )
    console.print(table)
    side = Table(title="on the device, per image (normalize_images; the flip when the loader leaves it there)")
    for column in ("device", "normalize us", "normalize + flip us"):
        side.add_column(column, justify="left" if column == "device" else "right")
    for device, values in results["device_side"].items():
        plain, flipped = values["normalize_us_per_image"], values["normalize_and_flip_us_per_image"]
        side.add_row(device, f"{plain:.1f}", f"{flipped:.1f}")
    console.print(side)
    if "gpu" in results:
        console.print(f"GPU decode: {results['gpu']}", markup=False)


if __name__ == "__main__":
    sys.exit(main())
