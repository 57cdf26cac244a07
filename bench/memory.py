"""Benchmark: peak memory versus the number of particles (L = 64), and GPU memory versus batch size.

Particles: ``cryoace simulate --preset demo`` writes ``--base`` real images (default 10⁴); star files
of N = 10⁴ and 10⁶ rows are then written whose ``rlnImageName`` entries (``index@stack.mrcs``)
reference those images over and over (a 10⁶-row star file with 10⁴ distinct images referenced 100
times each). Simulating 10⁶ particles would take ~19 min here; the reading code is exactly the same
(memory-mapped stacks, one fancy index per stack and batch), only the page cache is smaller.

Each measurement runs in a fresh process; its peak RSS is the kernel's high-water mark of that
process's own memory (``VmHWM`` in /proc/self/status). Not ``getrusage().ru_maxrss``: Linux carries
the parent's high-water mark over ``fork``/``vfork`` + ``exec`` into the child's ``ru_maxrss``, so a
child started by this script (which holds a 10⁶-row DataFrame while writing the star file) would
report the parent's peak instead of its own.

(a) ``iterate``: read the star file, open the normalized ``ParticleDataset``, iterate one shuffled
    pass in batches of 256 (``--iterate-limit`` caps the images read). Reported: the whole process's
    peak, the RSS after opening (metadata + torch), and the peak during iteration alone (the kernel's
    high-water mark reset via /proc/self/clear_refs after opening).
(b) ``predict``: ``cryoace predict-poses`` of a tiny trained run over all N particles (predicts and
    writes chunk by chunk; the compact particle table is the only O(N) structure). Its peak holds the
    mapped pages of every distinct image read, so compare sizes of at least ``--base`` particles.

On CUDA, the training step's peak GPU memory (``max_memory_allocated``) is measured per batch size.
Writes bench/results/memory_<device>.json.

    python bench/memory.py [--base 10000] [--sizes 10000 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

# Runs in the child process: prints one JSON line with the measurement.
ITERATE = r"""
import json, sys, time
import numpy as np

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # MiB

t0 = time.perf_counter()
from cryoace.io.particles import ParticleDataset, read_particles
star, limit = sys.argv[1], int(sys.argv[2])
dataset = ParticleDataset(read_particles(star), normalize=True)
opened_mib, open_s, open_peak = status("VmRSS"), time.perf_counter() - t0, status("VmHWM")
try:  # reset the peak-RSS mark so the iteration's own peak can be read (Linux >= 4.0)
    open("/proc/self/clear_refs", "w").write("5")
    reset = True
except OSError:
    reset = False
t1, seen = time.perf_counter(), 0
for batch in dataset.batches(256, shuffle=True, generator=0):
    seen += len(batch.index)
    if seen >= limit:
        break
iteration_peak = status("VmHWM")
print(json.dumps({"n": len(dataset), "images_read": seen, "open_s": open_s,
                  "images_per_s": seen / (time.perf_counter() - t1),
                  "rss_after_open_mib": opened_mib, "open_peak_mib": open_peak,
                  "iteration_peak_mib": iteration_peak if reset else None,
                  "rss_anon_end_mib": status("RssAnon"), "rss_file_end_mib": status("RssFile"),
                  "peak_rss_mib": max(open_peak, iteration_peak)}))
"""

PREDICT = r"""
import json, sys, time
from cryoace.cli.main import main
t0 = time.perf_counter()
code = main(["predict-poses", sys.argv[1], sys.argv[2], "-o", sys.argv[3], "--device", "cpu",
             "--batch-size", "512", "--quiet"])
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"rc": code, "seconds": time.perf_counter() - t0, "peak_rss_mib": hwm / 1024}))
"""


def child(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cryoace", *args], check=True, capture_output=True)


def repeated_star(source: Path, n: int, out: Path) -> Path:
    """A star file of ``n`` rows cycling through the rows (and so the images) of ``source``."""
    import numpy as np
    import starfile

    doc = starfile.read(source, always_dict=True)
    particles = doc["particles"]
    doc["particles"] = particles.iloc[np.arange(n) % len(particles)].reset_index(drop=True)
    starfile.write(doc, out)
    return out


def gpu_memory(device: torch.device, batch_sizes: list[int], size: int) -> list[dict]:
    """Peak GPU memory of a training step (paper preset, L = ``size``) per batch size."""
    import dataclasses

    import numpy as np
    from throughput import SyntheticDataset

    from cryoace.train.config import preset_config
    from cryoace.train.trainer import Trainer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in batch_sizes:
            torch.cuda.empty_cache()
            data = SyntheticDataset(batch, size, device)
            cfg = dataclasses.replace(preset_config("paper"), batch_size=batch, steps=10, device=str(device),
                                      tensorboard=False)
            trainer = Trainer(cfg, data, Path(tmp) / str(batch), progress=False)
            torch.cuda.reset_peak_memory_stats(device)
            for _ in range(2):
                trainer.train_step(data[np.arange(batch)])
            torch.cuda.synchronize(device)
            rows.append({"batch": batch, "L": size,
                         "peak_allocated_mib": torch.cuda.max_memory_allocated(device) / 2 ** 20})
            del trainer, data
    return rows


def summarize(result: dict) -> None:
    """Growth of the peak RSS from the smallest to the largest N (target < 10 %), and the split of the
    iteration's memory into what opening costs (metadata: O(N)) and what reading adds (images)."""
    for key in ("iterate", "predict"):
        rows = result[key]
        if len(rows) >= 2:
            lo, hi = rows[0]["peak_rss_mib"], rows[-1]["peak_rss_mib"]
            result[f"{key}_peak_rss_growth"] = hi / lo - 1
            print(f"{key}: peak RSS {lo:.0f} -> {hi:.0f} MiB ({100 * (hi / lo - 1):+.1f} %, target < 10 %)")
    rows = [r for r in result["iterate"] if r.get("iteration_peak_mib") is not None]
    if len(rows) >= 2:
        first, last = rows[0], rows[-1]
        result["reading_adds_mib"] = {r["n"]: r["iteration_peak_mib"] - r["rss_after_open_mib"] for r in rows}
        result["metadata_mib_per_million_particles"] = (
            (last["rss_after_open_mib"] - first["rss_after_open_mib"]) / (last["n"] - first["n"]) * 1e6)
        print(f"reading images adds {result['reading_adds_mib']} MiB over the opened dataset (flat in N); "
              f"the particle table costs {result['metadata_mib_per_million_particles']:.0f} MiB per 10^6 rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=int, default=10000, help="real simulated images")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 1000000])
    parser.add_argument("--iterate-limit", type=int, default=None, help="images read per pass (default: all)")
    parser.add_argument("--predict-sizes", type=int, nargs="+", default=None,
                        help="N for predict-poses (default: --sizes; a CPU predicts only a few hundred images/s). "
                             "Compare sizes >= --base: below it fewer distinct images (memory-mapped pages) are read")
    parser.add_argument("--predict-loss", choices=("symmetric", "l2"), default="symmetric",
                        help="the tiny run's loss: symmetric predictions also render the decoder per image")
    parser.add_argument("--no-predict", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the data here (default: a temp dir)")
    args = parser.parse_args()
    result: dict = {"box": 64, "base_images": args.base,
                    "construction": f"{args.base} images simulated by 'cryoace simulate --preset demo'; each "
                                    "N-row star file references them repeatedly (index@stack.mrcs, row i -> image "
                                    f"i mod {args.base}); same reading code as distinct images, smaller page cache",
                    "iterate": [], "predict": []}
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        cli("simulate", "--preset", "demo", "-n", str(args.base), "-o", str(work / "sim"), "--device", "cpu")
        star = next((work / "sim").glob("*.star"))
        result["simulate_s"] = time.perf_counter() - t0
        if not args.no_predict:
            cli("reconstruct", str(star), "-o", str(work / "run"), "--preset", "tiny", "--steps", "2",
                "--loss", args.predict_loss,
                "--device", "cpu", "--no-tensorboard", "--quiet", "--volume-every", "0")
        predict_sizes = set(args.sizes if args.predict_sizes is None else args.predict_sizes)
        result["predict_loss"] = args.predict_loss
        # glibc malloc settings change the heap's fragmentation, so they are part of the measurement
        result["malloc_env"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
        for n in sorted(set(args.sizes) | predict_sizes):
            big = repeated_star(star, n, star.parent / f"particles_{n}.star")  # stack paths are relative
            if n in args.sizes:
                row = {**child(ITERATE, str(big), str(args.iterate_limit or n)), "distinct_images": min(n, args.base)}
                result["iterate"].append(row)
                print(f"iterate N={n:>8}: peak RSS {row['peak_rss_mib']:.0f} MiB (after opening "
                      f"{row['rss_after_open_mib']:.0f}, iteration peak {row['iteration_peak_mib']:.0f}), "
                      f"{row['images_per_s']:.0f} images/s")
            if not args.no_predict and n in predict_sizes:
                row = {"n": n, "distinct_images": min(n, args.base),  # each one's pages end up mapped
                       **child(PREDICT, str(work / "run"), str(big), str(work / f"poses_{n}.star"))}
                result["predict"].append(row)
                print(f"predict N={n:>8}: peak RSS {row['peak_rss_mib']:.0f} MiB, {n / row['seconds']:.0f} images/s")
            big.unlink()
    summarize(result)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        result["gpu_memory"] = gpu_memory(device, [32, 64, 128, 256, 512], 128)
    else:
        result["gpu_memory"] = "skipped: no CUDA device"
    print(f"wrote {write_result('memory', device, result)}")


if __name__ == "__main__":
    main()
