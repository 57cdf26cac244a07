"""Gather every panel result into one table: bench/results/abinitio_panel_cpu.json.

``bench/abinitio_panel.py`` writes one file per invocation (a molecule, an SNR, some seeds). This
script reads them all (``bench/results/abinitio_panel_*_cpu.json``), keeps the runs of the **default
job** (no reconstruct options, 2000 particles — the issue's target), and for each molecule, SNR and
seed the **latest** run (the code changed between runs; a later run of the same case supersedes an
earlier one). Each case's success rate is given twice: over every seed's latest run, and over the runs
made with the current ab initio (``--since``: whole runs under a budget, and a kept start that another
run must find; earlier runs are listed but not counted there). Prints a Markdown table for the README.

    python bench/abinitio_panel_summary.py [--since 2026-12-07T05:27]
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import numpy as np
from common import RESULTS

#: the first commit of today's ab initio (f02eac2: whole runs sharing the budget, the run-to-run consensus)
CURRENT_AB_INITIO_SINCE = "2026-12-07T05:27"
SUMMARY_NAME = "abinitio_panel_cpu.json"
#: the table's order of SNRs: the issue's targets first, noise-free last
SNR_ORDER = {"0.1": 0, "0.05": 1, "inf": 2}


def default_job_runs(results: Path = RESULTS) -> list[dict]:
    """Every case of every panel file run as the default job, with the file's name and date."""
    runs = []
    for path in sorted(results.glob("abinitio_panel_*_cpu.json")):
        if path.name == SUMMARY_NAME:
            continue
        data = json.loads(path.read_text())
        if data.get("reconstruct_options") or data.get("n") != 2000:
            continue
        for case in data["cases"]:
            runs.append({"file": path.name, "date": data["date"], "commit": data["machine"].get("commit"), **case})
    return runs


def summarize(runs: list[dict], since: str) -> list[dict]:
    """Per molecule and SNR: the latest run of each seed, and the success rates (all, current code)."""
    latest: dict[tuple[str, str, int], dict] = {}
    earlier: dict[tuple[str, str], list[dict]] = {}  # superseded runs: listed, so that no failure goes unseen
    for run in sorted(runs, key=lambda r: r["date"]):
        key = run["molecule"], run["snr"], run["seed"]
        if key in latest:
            earlier.setdefault(key[:2], []).append(latest[key])
        latest[key] = run
    table = []
    for molecule, snr in sorted({key[:2] for key in latest}, key=lambda k: (SNR_ORDER.get(k[1], 3), k[0])):
        seeds = [latest[key] for key in sorted(latest) if key[:2] == (molecule, snr)]
        current = [run for run in seeds if run["date"] >= since]
        table.append({
            "molecule": molecule, "snr": snr,
            "seeds": [{key: run.get(key) for key in (
                "seed", "file", "date", "commit", "success", "honest", "resolved", "ratio_to_bound", "fsc05_px",
                "bound_fsc05_px", "median_error_deg", "fraction_beyond_20deg", "reported_px", "wall_time_s",
                "ab_initio_runs", "start_agreement_px", "start_agreement_between")} for run in seeds],
            "success_rate": float(np.mean([run["success"] for run in seeds])),
            "current_seeds": len(current),
            "current_successes": sum(bool(run["success"]) for run in current),
            "current_success_rate": float(np.mean([run["success"] for run in current])) if current else None,
            "honest_rate": float(np.mean([run["honest"] for run in seeds])),
            "earlier_runs": [{key: run.get(key) for key in ("seed", "file", "date", "success", "honest",
                                                             "ratio_to_bound", "median_error_deg")}
                             for run in earlier.get((molecule, snr), [])],
        })
    return table


def markdown(table: list[dict]) -> str:
    """The README's table: a row per molecule and SNR."""
    lines = ["| case | seeds (latest run each) | success | with today's ab initio | ×bound per seed | median error ° |"
             " honest | earlier runs of these seeds: failed / honest |", "|---|---|---|---|---|---|---|---|"]
    for row in table:
        seeds = row["seeds"]
        current = "—" if not row["current_seeds"] else f"{row['current_successes']}/{row['current_seeds']}"
        ids = ", ".join(str(s["seed"]) for s in seeds)
        ratios = ", ".join(f"{s['ratio_to_bound']:.2f}" for s in seeds)
        errors = ", ".join(f"{s['median_error_deg']:.1f}" for s in seeds)
        case = f"{row['molecule']} noise-free" if row["snr"] == "inf" else f"{row['molecule']} SNR {row['snr']}"
        lines.append(f"| {case} | {ids} | {sum(bool(s['success']) for s in seeds)}/"
                     f"{len(seeds)} | {current} | {ratios} | {errors} | {sum(bool(s['honest']) for s in seeds)}/"
                     f"{len(seeds)} | {sum(not r['success'] for r in row['earlier_runs'])} of "
                     f"{len(row['earlier_runs'])} / {sum(bool(r['honest']) for r in row['earlier_runs'])} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--since", default=CURRENT_AB_INITIO_SINCE,
                        help="runs from this date on (ISO) count as made with today's ab initio")
    args = parser.parse_args()
    table = summarize(default_job_runs(), args.since)
    if not table:
        print(f"no default-job panel results under {RESULTS}")
        return 1
    path = RESULTS / SUMMARY_NAME
    record = {"benchmark": "abinitio_panel", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "what": "the latest default-job run of each molecule, SNR and seed, gathered from "
                      "abinitio_panel_*_cpu.json by bench/abinitio_panel_summary.py",
              "current_ab_initio_since": args.since, "cases": table}
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    temporary.replace(path)
    print(markdown(table))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
