"""Benchmark: the taught encoder's training step (forward + backward + Adam, batch 64 at 32 px) in the
default memory layout against channels-last, side by side in one run (the taught encoder runs
channels-last). Writes bench/results/encoder_layout_<device>.json with the CPU load seen.

    python bench/encoder_layout.py [--widths 16,32] [--steps 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from cryoace.models.encoder import PoseEncoder  # noqa: E402
from cryoace.runtime import resolve_device  # noqa: E402


def step_ms(width: int, channels_last: bool, images: torch.Tensor, steps: int) -> float:
    """Mean wall time (ms) of one training step of the taught encoder's trunk of ``width``."""
    torch.manual_seed(0)
    encoder = PoseEncoder(images.shape[-1], 3.0, channels=(width, 2 * width, 4 * width, 4 * width),
                          convs_per_block=(1, 2, 2, 2), channels_last=channels_last)
    if channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(encoder.parameters(), 1e-3)

    def one() -> None:
        pose = encoder(images)
        loss = pose.rotmat.square().sum() + pose.shift_angst.square().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(2):
        one()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    return (time.perf_counter() - start) / steps * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="16,32")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two layouts (load drifts)")
    args = parser.parse_args()
    images = torch.randn(64, 32, 32, generator=torch.Generator().manual_seed(0))
    load0 = os.getloadavg()
    rows = []
    for width in map(int, args.widths.split(",")):
        times = {"default": [], "channels_last": []}
        for _ in range(args.rounds):
            times["default"].append(step_ms(width, False, images, args.steps))
            times["channels_last"].append(step_ms(width, True, images, args.steps))
        best = {k: min(v) for k, v in times.items()}
        rows.append({"width": width, "step_ms": times, "speedup": best["default"] / best["channels_last"]})
        print(f"width {width}: default {best['default']:.0f} ms, channels-last {best['channels_last']:.0f} ms "
              f"(×{rows[-1]['speedup']:.2f})", flush=True)
    path = write_result("encoder_layout", resolve_device("cpu"), {"batch": 64, "image_size": 32, "rows": rows,
                                                                   "load_average_start": load0,
                                                                   "load_average_end": os.getloadavg()})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
