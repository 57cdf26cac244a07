"""Re-score the runs of a finished ``bench/reconstruct.py`` result against the truth (e.g. after a
scoring fix), without training again: rewrites the JSON's curves and times to target in place.

    python bench/rescore_reconstruct.py bench/results/reconstruct_cpu.json [--work bench_work/reconstruct]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runs import score_snapshots, time_to_target  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path)
    parser.add_argument("--work", type=Path, default=Path("bench_work/reconstruct"))
    args = parser.parse_args()
    payload = json.loads(args.result.read_text())
    for key, run in payload["runs"].items():
        snr = key.split("_")[0]  # keys are <snr> or <snr>_<pipeline>
        curve = score_snapshots(args.work / f"run_{key}", args.work / f"data_{snr}" / "volume.mrc")
        target = run.get("target_px")
        run["curve"], run["time_to_target_s"] = curve, time_to_target(curve, target)
        print(f"{key}: {len(curve)} snapshots, time to {target} px: {run['time_to_target_s']}")
    args.result.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
