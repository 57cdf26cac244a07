"""The run report: one self-contained HTML page (RUN_DIR/report.html) summarising a run.

Sections (each an HTML ``<section>`` with a fixed id): ``timings`` (steps, training time, images/s,
final loss, from ``metrics.jsonl`` and ``config.yaml``), ``loss`` (the loss curve), ``fsc`` (FSC
against the truth from ``cryoace evaluate``'s ``evaluation.json``, FSC JSON files of ``cryoace fsc``
in the run directory, and the latest half-map FSC that training records in ``metrics.jsonl`` as
``"kind": "halves"``; first of all, the refinement's gold standard from ``gold_standard.json``: its
verdict — the resolution, or "not resolved" and why — and its unmasked, masked, phase-randomized and
corrected curves), ``resolution`` (the half-map FSC-0.143 resolution over training time),
``coverage`` (a Mollweide histogram of the viewing directions in ``poses.star``), ``map`` (central
slices and projections of ``volume.mrc``) and ``config`` (``config.yaml`` verbatim). A section whose
inputs are missing says so in one sentence instead of disappearing.

Self-contained: PNGs are embedded as base64 ``data:`` URIs, the CSS is inline, there is no script
and no network resource, so the file can be mailed or archived alone. Written atomically.
``evaluate`` never imports ``train``: everything is read from the run directory's files.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CryoaceInputError
from ..io.atomic import atomic_path
from .fsc import DEFAULT_THRESHOLDS, FSCResult
from .gold_standard import MIN_CONFIDENCE_RATIO

__all__ = ["write_report", "build_report", "SECTIONS", "fsc_from_halves_record"]

#: the refinement's gold standard (:class:`~cryoace.evaluate.gold_standard.GoldStandard`) in a run directory
GOLD_STANDARD_FILE = "gold_standard.json"

#: poses plotted at most in the coverage section (evenly spaced rows of poses.star beyond that)
COVERAGE_SAMPLE = 200_000

#: section id -> heading, in page order
SECTIONS = {
    "timings": "Timings",
    "stages": "Stages and time budget",
    "loss": "Loss",
    "fsc": "Fourier shell correlation",
    "resolution": "Resolution over time",
    "coverage": "Orientation coverage",
    "teach": "Encoder taught from the map",
    "map": "Final map",
    "config": "Configuration",
}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 980px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
.meta { color: #666; font-size: 0.9em; }
nav a { margin-right: 1em; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.92em; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.7em; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
img { max-width: 100%; height: auto; display: block; margin: 0.6em 0; }
pre { background: #f7f7f7; border: 1px solid #e3e3e3; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.missing { color: #8a6d3b; font-style: italic; }
.unresolved { color: #a94442; background: #f2dede; border: 1px solid #ebccd1; padding: 0.6em; }
"""


# ---------------------------------------------------------------------------------------------
# Reading the run directory
# ---------------------------------------------------------------------------------------------

def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _run_pixel_size(config: dict[str, Any]) -> float | None:
    """Å/px of the training images, from config.yaml's data description."""
    value = (config.get("data") or {}).get("pixel_size")
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def fsc_from_halves_record(record: dict[str, Any], pixel_size: float | None = None) -> FSCResult:
    """An :class:`FSCResult` from a ``"kind": "halves"`` metrics record (``freq_cyc_angst``, ``fsc``).

    ``pixel_size`` (Å/px) converts 1/Å to cycles/px; without it the last frequency is taken to be
    Nyquist (0.5 cycles/px). The box is the reciprocal of the shell spacing in cycles/px (shells are
    one voxel wide). ``n_voxels`` is not recorded (zeros)."""
    freq = np.asarray(record["freq_cyc_angst"], dtype=np.float64)
    curve = np.asarray(record["fsc"], dtype=np.float64)
    if freq.ndim != 1 or freq.shape != curve.shape or len(freq) < 2 or not np.all(np.diff(freq) > 0):
        raise ValueError("a halves record needs increasing freq_cyc_angst and an fsc of the same length")
    px = pixel_size if pixel_size else 0.5 / float(freq[-1])
    freq_px = freq * px
    box = int(round(1.0 / float(freq_px[1] - freq_px[0])))
    return FSCResult(freq_cyc_px=freq_px, curve=curve, n_voxels=np.zeros(len(curve), dtype=np.int64),
                     box_size=box, voxel_size=px)


def _fsc_json_files(run_dir: Path) -> dict[str, FSCResult]:
    """FSC curves saved as JSON in the run directory: ``evaluation.json``'s ``fsc_vs_truth`` and any
    ``*.json`` written by ``cryoace fsc --json`` (an :meth:`FSCResult.to_dict`)."""
    found: dict[str, FSCResult] = {}
    for path in sorted(run_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        if path.name == GOLD_STANDARD_FILE:
            continue  # its own part of the section (_gold_standard)
        if path.name == "evaluation.json":
            data, label = data.get("fsc_vs_truth"), "vs ground truth (cryoace evaluate)"
        else:
            label = f"{path.stem} (cryoace fsc)"
        if isinstance(data, dict) and {"freq_cyc_px", "curve", "n_voxels", "box_size"} <= set(data):
            try:
                found[label] = FSCResult.from_dict(data)
            except (KeyError, TypeError, ValueError):
                continue
    return found


# ---------------------------------------------------------------------------------------------
# HTML pieces
# ---------------------------------------------------------------------------------------------

def _png(plot: Callable[[io.BytesIO], None], alt: str) -> str:
    """Run ``plot`` into memory and return an ``<img>`` with the PNG as a base64 data URI."""
    buf = io.BytesIO()
    plot(buf)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _missing(sentence: str) -> str:
    return f'<p class="missing">{html.escape(sentence)}</p>'


def _table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min ({seconds:.0f} s)"
    return f"{seconds / 3600:.2f} h ({seconds:.0f} s)"


def _res_text(res) -> str:
    value = f"{res.angstrom:.2f} Å" if res.angstrom is not None else f"{res.px:.2f} px"
    return ("" if res.crossed else "≤ ") + value


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

def _timings(train: list[dict], rollbacks: list[dict], config: dict[str, Any]) -> str:
    data = config.get("data") or {}
    prov = config.get("provenance") or {}
    settings = config.get("config") or {}  # config.yaml: config (settings), seeds, data, provenance
    rows: list[tuple[str, str]] = []
    if train:
        last = train[-1]
        rows += [("steps", f"{int(last['step']):,}"),
                 ("epochs", f"{float(last.get('epoch', 0.0)):.2f}"),
                 ("training time", _duration(last.get("elapsed_s", 0.0)))]
        rates = [float(r["images_per_s"]) for r in train if math.isfinite(float(r.get("images_per_s", math.nan)))]
        if rates:
            rows.append(("images / s", f"{np.mean(rates):,.1f} (mean of {len(rates)} logged intervals)"))
        rows.append(("final loss", f"{float(last['loss']):.5g}"))
    if rollbacks:
        rows.append(("NaN rollbacks", str(len(rollbacks))))
    if data:
        rows.append(("particles", f"{int(data.get('n_particles', 0)):,} of {data.get('image_size', '?')} px at "
                                  f"{float(data.get('pixel_size', 0.0)):.4g} Å/px"))
    for key, label in (("preset", "preset"), ("batch_size", "batch size"), ("device", "device")):
        if key in settings:
            rows.append((label, str(settings[key])))
    if prov.get("time_utc"):
        rows.append(("started", str(prov["time_utc"])))
    if prov.get("cryoace_version"):
        rows.append(("cryoace version", str(prov["cryoace_version"])))
    if not rows:
        return _missing("No training records (metrics.jsonl) or config.yaml in this run directory.")
    return _table(rows)


def _stages(records: list[dict], config: dict[str, Any]) -> str:
    """Each stage of the run (``stage`` records, :mod:`cryoace.pipeline.budget`): when it started, how long
    it took and its share of ``--max-time``."""
    from ..pipeline.budget import STAGE_NAMES

    if not records:
        return _missing("No stage records in metrics.jsonl (--halves runs and older versions of cryoace write "
                        "none).")
    total = (config.get("config") or {}).get("max_time_s")
    rows = [(STAGE_NAMES.get(r["stage"], r["stage"]),
             f"{_duration(float(r['duration_s']))} from {_duration(float(r['started_s']))} into the run"
             + ("" if r.get("budget_s") is None else f" (budget {_duration(float(r['budget_s']))})")
             + ("" if r.get("searched_globally") is None else  # the final pass: how many needed the global search
                f"; {r['particles']:,} particles, {r['searched_globally']:,} of them searched globally over SO(3)"))
            for r in records]
    end = max(float(r["elapsed_s"]) for r in records)
    rows.append(("the whole run", _duration(end) + ("" if total is None else
                                                    f" of a {_duration(float(total))} budget (--max-time)")))
    return _table(rows)


def _loss(metrics: Path, train: list[dict]) -> str:
    from .plots import plot_loss

    if not train:
        return _missing("No training loss records in metrics.jsonl.")
    return _png(lambda f: plot_loss(metrics, f), "training loss against step")


def _read_gold_standard(run_dir: Path):
    """The run's :class:`~cryoace.evaluate.gold_standard.GoldStandard` (None without one) and, when
    its file exists but cannot be read, why (else None)."""
    from .gold_standard import GoldStandard

    path = run_dir / GOLD_STANDARD_FILE
    if not path.is_file():
        return None, None
    try:
        return GoldStandard.from_dict(json.loads(path.read_text())), None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"The gold-standard FSC ({GOLD_STANDARD_FILE}) could not be read ({exc})."


def _gold_standard(gold, problem: str | None) -> str:
    """The gold-standard part of the FSC section (verdict, curves with the 0.143 line, table)."""
    from .plots import plot_fsc

    if gold is None:
        return "" if problem is None else _missing(problem)
    if gold.resolved:
        verdict = (f"<p>Gold-standard resolution (half maps refined apart, FSC 0.143, unmasked): "
                   f"<strong>{html.escape(_res_text(gold.resolution()))}</strong>; inside the solvent mask "
                   f"(phase-randomization corrected) {html.escape(_res_text(gold.resolution(masked=True)))}.</p>")
    else:
        verdict = ('<p class="unresolved"><strong>NOT RESOLVED — no resolution is claimed:</strong> '
                   + html.escape("; ".join(gold.reasons)) + ".</p>")
    curves = gold.curves()
    where = ("no phase randomization was needed" if gold.fsc.randomize_from_shell is None else
             f"phases randomized from shell {gold.fsc.randomize_from_shell}")
    rows = [("half maps", "volume_half1.mrc, volume_half2.mrc (mask volume_mask.mrc)"),
            ("start low-pass", f"{gold.start_resolution_px:.2f} px"),
            ("median pose confidence", "—" if gold.confidence_median is None else f"{gold.confidence_median:.2f}"),
            ("pose confidence: particles vs the map's own projections (predictive check)",
             "—" if gold.check is None else
             f"{gold.check.observed:.2f} vs {gold.check.expected:.2f} (ratio {gold.check.ratio:.2f}, "
             f"{'passed' if gold.check.passed else 'FAILED'}: at least {MIN_CONFIDENCE_RATIO:g} needed)"),
            ("independent ab initio maps agree to (FSC 0.5)",
             "—" if gold.start_agreement is None else
             f"{gold.start_agreement.label}: {gold.start_agreement.px:.2f} px "
             f"({'confirmed' if gold.start_agreement.confirmed else 'NOT confirmed'}: "
             f"at most {gold.start_agreement.limit_px:.2f} px needed)"),
            ("mask correction", where)]
    rows += [(f"FSC 0.143, {label}", _res_text(curve.resolution(0.143))) for label, curve in curves.items()]
    plot = _png(lambda f: plot_fsc(curves, f, thresholds=(0.143,), title="gold-standard FSC of the half maps"),
                "gold-standard FSC curves")
    return verdict + plot + _table(rows)


def _verdict_banner(gold) -> str:
    """A line above the sections with the run's gold-standard verdict ("" without one)."""
    if gold is None:
        return ""
    if gold.resolved:
        return (f"<p><strong>Result:</strong> gold-standard resolution "
                f"{html.escape(_res_text(gold.resolution()))} (FSC 0.143 of independent half maps).</p>\n")
    return ('<p class="unresolved"><strong>Result: NOT RESOLVED.</strong> No resolution is claimed: '
            + html.escape("; ".join(gold.reasons)) + ".</p>\n")


def _fsc(run_dir: Path, halves: list[dict], pixel_size: float | None, gold=None,
         gold_problem: str | None = None) -> str:
    from .plots import plot_fsc

    curves = _fsc_json_files(run_dir)
    has_gold = gold is not None
    parts = [_gold_standard(gold, gold_problem)]
    if halves:
        last = halves[-1]
        try:
            curves[f"half maps at step {int(last['step'])}"] = fsc_from_halves_record(last, pixel_size)
        except (KeyError, TypeError, ValueError) as exc:
            parts.append(_missing(f"The latest half-map FSC record could not be read ({exc})."))
        res = last.get("resolution_angst")
        if res is not None:
            parts.append(f"<p>Half-map resolution (FSC 0.143) at step {int(last['step']):,}: "
                         f"<strong>{float(res):.2f} Å</strong>.</p>")
    if not curves:
        if not has_gold:
            parts.append(_missing("No FSC curves: no gold-standard half maps (--refine), no half-map FSC "
                                  "records (training with --halves) and no FSC against a true map (cryoace "
                                  "evaluate --truth-map) in this run directory."))
        return "".join(parts)
    rows = [(label, "; ".join(f"FSC {t:g}: {_res_text(r.resolution(t))}" for t in DEFAULT_THRESHOLDS))
            for label, r in curves.items()]
    parts.insert(1, _png(lambda f: plot_fsc(curves, f, title="Fourier shell correlation"), "FSC curves"))
    parts.append(_table(rows))
    if not halves and not has_gold:
        parts.append(_missing("No half-map FSC records in metrics.jsonl (training with --halves writes them)."))
    if not any(label.startswith("vs ground truth") for label in curves):
        parts.append(_missing("No FSC against a true map (run cryoace evaluate --truth-map to add one)."))
    return "".join(parts)


def _resolution(halves: list[dict]) -> str:
    from .plots import plot_resolution_history

    points = [(float(r.get("elapsed_s", math.nan)), int(r["step"]), float(r["resolution_angst"]))
              for r in halves if r.get("resolution_angst") is not None]
    if not points:
        return _missing("No half-map resolution records in metrics.jsonl (training with --halves writes "
                        "them), so there is no resolution history.")
    t, steps, res = (np.array(v, dtype=np.float64) for v in zip(*points, strict=True))
    use_time = bool(np.all(np.isfinite(t)))
    x = t / 60.0 if use_time else steps
    img = _png(lambda f: plot_resolution_history({"half maps, FSC 0.143": (x, res)}, f,
                                                 "training time (min)" if use_time else "step"),
               "half-map resolution over training")
    rows = [(f"step {int(s):,}" + (f" ({_duration(e)})" if use_time else ""), f"{r:.2f} Å")
            for e, s, r in zip(t, steps, res, strict=True)]
    return img + _table(rows[-12:])  # the latest dozen; the plot shows all


def _teach(records: list[dict]) -> str:
    """The encoder taught from the final map (reconstruct --teach-encoder): its poses against the
    refined ones of a sample of particles, as it learned."""
    if not records:
        return _missing("No encoder was taught from the map (reconstruct --teach-encoder T does it; cryoace "
                        "predict-poses then uses it).")
    rows = [(f"step {int(r['iteration']):,} ({_duration(float(r['elapsed_s']))} into the run)",
             "—" if r.get("median_deg") is None else
             f"median {r['median_deg']:.1f}° from the refined poses, {100 * r['within_15deg']:.0f} % within 15°; "
             f"training loss ‖ΔR‖² {r['rotation_loss']:.3f}") for r in records]
    return ("<p>Poses in one forward pass: the encoder taught from the final map "
            "(checkpoints/encoder_taught.pt) against the refined poses of a sample of particles.</p>"
            + _table(rows[-12:]))


def _coverage(run_dir: Path) -> str:
    from ..io.particles import read_particles
    from .plots import plot_pose_confidence, plot_viewing_directions

    path = run_dir / "poses.star"
    if not path.is_file():
        return _missing("No poses.star in this run directory (it is written at the end of a run).")
    table = read_particles(path)
    if not table.has_pose:
        return _missing("poses.star holds no angles.")
    n = len(table)
    # evenly spaced rows stand for all of them: matrices for 10⁷ particles would take 720 MB
    rows = np.unique(np.linspace(0, n - 1, min(n, COVERAGE_SAMPLE)).astype(np.int64))
    rotmat = table.pose_rows(rows).rotmat
    sampled = f", {len(rows):,} evenly spaced particles of {n:,}" if len(rows) < n else ""
    body = _png(lambda f: plot_viewing_directions(rotmat, f), f"viewing directions (Mollweide projection{sampled})")
    confidence = table.extra_column("cryoacePoseConfidence")
    if confidence is not None:  # written by the refinement: which particles' poses are determined
        body += ("<p>Pose confidence per particle (<code>cryoacePoseConfidence</code> in poses.star): "
                 "low values mark particles whose best matches are scattered over SO(3).</p>"
                 + _png(lambda f: plot_pose_confidence(confidence, f), "histogram of the pose confidences"))
    return body


def _map(run_dir: Path) -> str:
    from ..io.mrc import read_volume
    from .plots import plot_volume

    path = run_dir / "volume.mrc"
    if not path.is_file():
        return _missing("No volume.mrc in this run directory (it is written at the end of a run).")
    vol = read_volume(path)
    voxel = float(vol.voxel_size) if vol.voxel_size and vol.voxel_size > 0 else None
    return _png(lambda f: plot_volume(vol.data, f, voxel, title=f"volume.mrc: {vol.data.shape[0]}³"
                                      + (f", {voxel:.4g} Å/voxel" if voxel else "")),
                "central slices and projections of the final map")


def _config(run_dir: Path) -> str:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return _missing("No config.yaml in this run directory.")
    return f"<pre>{html.escape(path.read_text())}</pre>"


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------

def _shown(path: str | os.PathLike) -> str:
    """A path as text for the page: bytes that are not UTF-8 in a file name (kept by Python as
    surrogates) become U+FFFD instead of making the page unwritable."""
    return os.fsencode(path).decode("utf-8", errors="replace")


def build_report(run_dir: str | os.PathLike) -> str:
    """The report of ``run_dir`` as an HTML string (module docstring). A missing directory, or one
    with neither ``config.yaml`` nor ``metrics.jsonl``, raises :class:`CryoaceInputError`."""
    from .. import __version__
    from .plots import read_metrics

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CryoaceInputError("run directory not found", run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not (run_dir / "config.yaml").is_file() and not metrics.is_file():
        raise CryoaceInputError("not a run directory (no config.yaml or metrics.jsonl)", run_dir)
    config = _load_yaml(run_dir / "config.yaml")
    train, halves = read_metrics(metrics, "train"), read_metrics(metrics, "halves")
    rollbacks = read_metrics(metrics, "rollback")
    gold, gold_problem = _read_gold_standard(run_dir)
    bodies = {
        "timings": _timings(train, rollbacks, config),
        "stages": _stages(read_metrics(metrics, "stage"), config),
        "loss": _loss(metrics, train),
        "fsc": _fsc(run_dir, halves, _run_pixel_size(config), gold, gold_problem),
        "resolution": _resolution(halves),
        "coverage": _coverage(run_dir),
        "teach": _teach(read_metrics(metrics, "teach")),
        "map": _map(run_dir),
        "config": _config(run_dir),
    }
    name = html.escape(_shown(run_dir.resolve().name))
    banner = _verdict_banner(gold)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = " ".join(f'<a href="#{key}">{html.escape(title)}</a>' for key, title in SECTIONS.items())
    sections = "\n".join(f'<section id="{key}">\n<h2>{html.escape(SECTIONS[key])}</h2>\n{bodies[key]}\n</section>'
                         for key in SECTIONS)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>cryoace run report: {name}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>cryoace run report: {name}</h1>\n"
            f'<p class="meta">{html.escape(_shown(run_dir.resolve()))} · made {now} by cryoace '
            f"{html.escape(__version__)}</p>\n{banner}<nav>{nav}</nav>\n{sections}\n</body>\n</html>\n")


def write_report(run_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Write :func:`build_report` to ``path`` (default ``run_dir/report.html``) atomically; return it."""
    text = build_report(run_dir)
    path = Path(path) if path is not None else Path(run_dir) / "report.html"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8", errors="replace")  # e.g. a non-UTF-8 name in config.yaml
    return path
