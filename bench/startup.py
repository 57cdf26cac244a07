"""Benchmark: start-up time of `cryoace --help`, `cryoace --version` and `cryoace <command> --help`.

Each command runs in a fresh interpreter (``python -m cryoace``, what the ``cryoace`` script runs);
the median of --repeats runs is reported next to a bare ``python -c pass`` (the interpreter's own
start), and whether the command imported torch. Target: `cryoace --help` under 0.5 s. Writes
bench/results/startup_cpu.json.

    python bench/startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

TARGET_S = 0.5
# runs main(argv) as the console script does, then reports whether torch got imported
PROBE = ("import sys; from cryoace.cli.main import main\n"
         "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
         "sys.stderr.write('torch imported: %s\\n' % ('torch' in sys.modules))")


def median_seconds(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def imports_torch(args: list[str]) -> bool:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True)
    return "torch imported: True" in out.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    cases = {"--help": ["--help"], "--version": ["--version"], "reconstruct --help": ["reconstruct", "--help"],
             "predict-poses --help": ["predict-poses", "--help"]}
    python_s = median_seconds([sys.executable, "-c", "pass"], args.repeats)
    results = []
    for label, cli_args in cases.items():
        seconds = median_seconds([sys.executable, "-m", "cryoace", *cli_args], args.repeats)
        torch_loaded = imports_torch(cli_args)
        results.append({"command": f"cryoace {label}", "median_s": round(seconds, 4),
                        "imports_torch": torch_loaded})
        print(f"cryoace {label:<22} {seconds:6.3f} s (median of {args.repeats}; torch imported: {torch_loaded})")
    print(f"python -c pass{'':<17} {python_s:6.3f} s")
    help_s = results[0]["median_s"]
    path = write_result("startup", torch.device("cpu"), {
        "repeats": args.repeats, "target_s": TARGET_S, "python_start_s": round(python_s, 4),
        "commands": results, "help_meets_target": help_s < TARGET_S})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
