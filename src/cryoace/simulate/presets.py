"""Named simulation settings: the papers' datasets we can build here, and a fast built-in demo.

A preset fixes the molecule (a model shipped with cryoace, or one the user must give), the map it is
turned into (box, pixel size, molmap resolution) and the particle settings (number, SNR, shifts,
CTF). Options given on the command line override a preset's values.

* ``adk``   — adenylate kinase, open state (PDB 4AKE chain A; model shipped in ``cryoace/data``), the
  ablation molecule: L = 64 at 1.5 Å/px, molmap at 6 Å (as ``volumes/adk_open_4ake_L64_1.5A.mrc``),
  50 000 particles at −10 dB. The box is small (96 Å), so the defocus is kept low (median 4000 Å, spread 0.15):
  with the usual 1.5 µm the CTF would alias near Nyquist in a 64-px box.
* ``demo``  — the same molecule and settings with 2000 particles (a few seconds on a laptop CPU).
* ``spike`` — SARS-CoV-2 spike, open state (PDB 6VYB; give the ``6vyb.cif.gz`` path): L = 128 at
  3.0 Å/px, molmap at 6 Å (as ``volumes/spike_6vyb_L128_3.0A.mrc``), 50 000 particles at −10 dB
  (add ``--noise-free`` for the clean set), defocus median 1.5 µm.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..errors import CryoaceInputError

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
ADK_MODEL = DATA_DIR / "adk_open_4ake_chainA.pdb"


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named setting. ``model`` is a shipped file, or None when the user gives the model path."""

    name: str
    description: str
    model: Path | None
    model_hint: str
    box: int
    pixel_size: float
    resolution: float
    n: int
    settings: dict[str, Any]  # SimulationConfig fields


_ADK_SETTINGS = dict(snr_db=-10.0, shift_std_angst=3.0, defocus_median=4000.0, defocus_spread=0.15,
                     astigmatism=200.0, voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1)

PRESETS: dict[str, Preset] = {
    "adk": Preset("adk", "adenylate kinase 4AKE (shipped model), L=64 at 1.5 Å/px, 6 Å molmap, 50000 "
                  "particles, -10 dB", ADK_MODEL, "", 64, 1.5, 6.0, 50_000, dict(_ADK_SETTINGS)),
    "demo": Preset("demo", "built-in demo: adenylate kinase, L=64 at 1.5 Å/px, 2000 particles, -10 dB",
                   ADK_MODEL, "", 64, 1.5, 6.0, 2000, dict(_ADK_SETTINGS)),
    "spike": Preset("spike", "SARS-CoV-2 spike 6VYB (give the model), L=128 at 3.0 Å/px, 6 Å molmap, "
                    "50000 particles, -10 dB", None,
                    "give the 6VYB model, e.g. 'cryoace simulate 6vyb.cif.gz --preset spike -o DIR'",
                    128, 3.0, 6.0, 50_000,
                    dict(snr_db=-10.0, shift_std_angst=6.0, defocus_median=15000.0, defocus_spread=0.2,
                         astigmatism=500.0, voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1)),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; :class:`CryoaceInputError` listing the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise CryoaceInputError(f"unknown preset {name!r} (known presets: {known})") from None
