"""Benchmark: `cryoace simulate` throughput and peak memory versus the number of particles (L = 64).

Each size runs in a fresh process (peak RSS from getrusage of that child), so the figures show that
memory stays flat as N grows. Writes bench/results/simulate_<device>.json.

    python bench/simulate.py [--sizes 2000 20000 100000]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402


def run(n: int, workdir: Path) -> dict:
    out = workdir / f"sim_{n}"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cryoace", "simulate", "--preset", "demo", "-n", str(n), "-o", str(out),
                    "--device", "cpu"], check=True, capture_output=True)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    shutil.rmtree(out)
    # ru_maxrss of children is the max over all children so far: sizes run in increasing order
    return {"n": n, "seconds": seconds, "images_per_s": n / seconds, "peak_rss_mib": peak_kib / 1024,
            "peak_rss_grew": peak_kib > before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 100000])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted(args.sizes):
            rows.append(row := run(n, Path(tmp)))
            print(f"simulate N={n}: {row['images_per_s']:.0f} images/s, peak RSS {row['peak_rss_mib']:.0f} MiB")
    path = write_result("simulate", torch.device("cpu"), {"box": 64, "preset": "demo", "runs": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
