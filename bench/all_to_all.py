"""All-to-all 1:1 (MFR style) on N embeddings: the time of `evaluation.all_to_all` for every pair, apart from any
model.

    python bench/all_to_all.py --out all_to_all.json                      # 100,000 x 512-d: 10,000 identities x 10
    python bench/all_to_all.py --identities 1000 --images 10 --dim 128    # smaller
    python bench/all_to_all.py --embeddings faces.safetensors             # embeddings of real faces (evaluate.embed)
    python bench/all_to_all.py --tiny                                      # seconds: what the test suite runs

The generated embeddings are structured like a face set: each identity has a random unit centre, each of its images
is the centre plus Gaussian noise (`--noise`, per dimension), normalized, so genuine scores sit well above impostor
scores and TAR at FAR 1e-6 is neither 0 nor 1. The JSON holds the machine, the load average before and after (the
figures depend on what else the machine runs), the counts, the TARs and the wall and CPU time of the metric.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/all_to_all.py` puts bench/ first on sys.path; the project must be importable from any folder.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from evaluation.all_to_all import DEFAULT_BLOCK, FAR_TARGETS, all_to_all, read_embeddings  # noqa: E402
from trainer.reporting import machine_info  # noqa: E402


def structured_embeddings(identities: int, images: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, ...]:
    """(embeddings (identities x images, dim) float32 L2-normalized, labels): centre + noise per image."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((identities, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(identities), images)
    embeddings = centres[labels] + rng.standard_normal((len(labels), dim)).astype(np.float32) * noise
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings, labels


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--identities", type=int, default=10_000)
    parser.add_argument("--images", type=int, default=10, help="images per identity")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--noise", type=float, default=0.08, help="per-dimension noise around an identity's centre")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embeddings", type=Path, help="time on these embeddings (.safetensors) instead")
    parser.add_argument("--block", type=int, default=DEFAULT_BLOCK)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2: the cores of the brief's machine)")
    parser.add_argument("--tiny", action="store_true", help="300 embeddings: seconds")
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    args = parser.parse_args()
    if args.tiny:
        args.identities, args.images, args.dim, args.block = 60, 5, 32, 64
    torch.set_num_threads(args.threads)
    if args.embeddings is not None:
        embeddings, labelled = read_embeddings(args.embeddings)
        embeddings /= np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        labels = np.unique(np.asarray(labelled.identities), return_inverse=True)[1]
        source = str(args.embeddings)
    else:
        embeddings, labels = structured_embeddings(args.identities, args.images, args.dim, args.noise, args.seed)
        source = f"generated: {args.identities} identities x {args.images} images, {args.dim}-d, noise {args.noise}"
    load_before = os.getloadavg()
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    result = all_to_all(embeddings, labels, FAR_TARGETS, block=args.block)
    wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    load_after = os.getloadavg()
    pairs = result.num_genuine + result.num_impostor
    figures = {
        "benchmark": "all_to_all",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "threads": args.threads,
        "block": args.block,
        "source": source,
        "embeddings": len(embeddings),
        "dim": int(embeddings.shape[1]),
        "identities": result.num_identities,
        "genuine_pairs": result.num_genuine,
        "impostor_pairs": result.num_impostor,
        "tar_at_far": {f"{p.far_target:g}": p.tar for p in result.points},
        "threshold": {f"{p.far_target:g}": p.threshold for p in result.points},
        "wall_s": wall,
        "cpu_s": cpu,
        "pairs_per_s": pairs / wall,
    }
    table = Table(title=f"all-to-all 1:1: {len(embeddings)} x {embeddings.shape[1]}-d ({source})")
    table.add_column("")
    table.add_column("value", justify="right")
    for key in ("identities", "genuine_pairs", "impostor_pairs"):
        table.add_row(key.replace("_", " "), f"{figures[key]:,}")
    for point in result.points:
        table.add_row(f"TAR at FAR {point.far_target:g} (threshold)", f"{point.tar:.5f} ({point.threshold:.4f})")
    table.add_row("wall time", f"{wall:.1f} s ({pairs / wall / 1e6:.1f} M pairs/s)")
    table.add_row("CPU time (this process)", f"{cpu:.1f} s")
    table.add_row("load average before / after", f"{load_before[0]:.1f} / {load_after[0]:.1f}")
    Console().print(table)
    if args.out is not None:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
