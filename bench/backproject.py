"""Benchmark: direct Fourier inversion throughput (images/s) at L = 64 and 128, CPU or CUDA.

Prints images/s per box size and writes bench/results/backproject_<device>.json.

    python bench/backproject.py [--device auto|cpu|cuda] [--images 512]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from cryoace.physics.rotations import random_rotmat  # noqa: E402
from cryoace.reconstruct.backproject import FourierAccumulator  # noqa: E402
from cryoace.runtime import resolve_device  # noqa: E402
from cryoace.types import CTFParams  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(size: int, n_images: int, batch: int, device: torch.device) -> float:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n_images, size, size, generator=g)
    rotmat = random_rotmat(n_images, g)
    shift = torch.randn(n_images, 2, generator=g)
    ctf = CTFParams.create(torch.full((n_images,), 15000.0), dtype=torch.float32)
    acc = FourierAccumulator(size, device=device)
    acc.insert(images[:batch], rotmat[:batch], shift[:batch], 1.0, ctf[:batch])  # warm-up
    sync(device)
    start = time.perf_counter()
    for s in range(0, n_images, batch):
        acc.insert(images[s:s + batch], rotmat[s:s + batch], shift[s:s + batch], 1.0, ctf[s:s + batch])
    acc.volume()
    sync(device)
    return n_images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    device = resolve_device(args.device)
    rates = {}
    for size in (64, 128):
        n = args.images if size == 64 else max(args.batch, args.images // 4)
        rates[f"L{size}"] = rate = measure(size, n, args.batch, device)
        print(f"backproject L={size}: {rate:.0f} images/s on {device}")
    path = write_result("backproject", device, {"images_per_s": rates, "pad_factor": 2, "batch": args.batch})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
