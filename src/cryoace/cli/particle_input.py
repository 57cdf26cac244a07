"""The particle-input options shared by every command that reads particle images, and the one function
that opens a particle table from them.

Options (:func:`add_particle_input_args`): ``--pixel-size`` (Å/px, for files without one; it wins
over the file's, with a note when they differ), cryoDRGN's inputs ``--ctf ctf.pkl`` and
``--poses pose.pkl`` next to an ``.mrcs`` stack, and the selection ``--ind FILE`` (cryoDRGN index
file) then ``--first N``. :func:`open_particle_table` reads the file given on the command line with
them. Neither imports numpy or torch before it is called (``cryoace <command> --help`` stays fast).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import CryoaceInputError

STACK_SUFFIXES = (".mrcs", ".mrc")
#: how far a file's pixel size may differ from --pixel-size before the note (relative)
PIXEL_SIZE_RTOL = 1e-4


def add_particle_input_args(parser: argparse.ArgumentParser, poses_flag: str | None = "--poses",
                            ctf: bool = True) -> None:
    """Add the particle-input options to ``parser`` (as the group "particle input").

    poses_flag : the name of the cryoDRGN poses option (None: the command takes no input poses, e.g.
                 because it predicts them); its value is ``args.<flag without dashes>``.
    ctf        : offer ``--ctf`` (commands that never use a CTF leave it out).
    """
    g = parser.add_argument_group("particle input")
    g.add_argument("--pixel-size", type=float, metavar="Å",
                   help="pixel size of the stored images (Å/px): needed when the file has none (e.g. "
                   "relion_project's star files, a bare stack); when the file has one too, this one is "
                   "used and a differing value is noted")
    if ctf:
        g.add_argument("--ctf", type=Path, metavar="PKL",
                       help="cryoDRGN CTF pickle (N×9) for an .mrcs stack (its pixel size is used too)")
    if poses_flag is not None:
        g.add_argument(poses_flag, type=Path, metavar="PKL",
                       help="cryoDRGN poses pickle (rotations, shifts as a fraction of the box) for an .mrcs stack")
    g.add_argument("--ind", type=Path, metavar="FILE",
                   help="use only these particles: a cryoDRGN index file (.pkl of a 0-based integer array, "
                   "or a text file of 0-based integers), in its order")
    g.add_argument("--first", type=int, metavar="N", help="use only the first N particles (after --ind)")


def _note_to_stderr(args: argparse.Namespace) -> Callable[[str], None]:
    command = getattr(args, "command", None)
    prefix = f"cryoace {command}" if command else "cryoace"
    return lambda message: print(f"{prefix}: note: {message}", file=sys.stderr)


def _read(path: Path, args: argparse.Namespace, poses: Path | None, pixel_size: float | None):
    from ..io.cryodrgn import table_from_stack
    from ..io.particles import read_particles

    ctf = getattr(args, "ctf", None)
    if path.suffix.lower() in STACK_SUFFIXES:
        if getattr(args, "datadir", None) is not None:
            raise CryoaceInputError("--datadir is for star/.cs files that name their stacks; an .mrcs stack "
                                    "is read where it is given", path)
        return table_from_stack(path, poses=poses, ctf=ctf, pixel_size=pixel_size)
    if poses is not None or ctf is not None:
        flag = "--ctf" if poses is None else "the poses pickle"
        raise CryoaceInputError(f"{flag} goes with an .mrcs stack (cryoDRGN input); a .star or .cs file "
                                "carries its own poses and CTF", path)
    return read_particles(path, datadir=getattr(args, "datadir", None), pixel_size=pixel_size)


def _read_with_pixel_size(path: Path, args: argparse.Namespace, poses: Path | None,
                          note: Callable[[str], None]):
    """The table with the file's pixel size, or --pixel-size where the file has none or differs."""
    import numpy as np

    wanted = getattr(args, "pixel_size", None)
    if wanted is not None and not (np.isfinite(wanted) and wanted > 0):
        raise CryoaceInputError(f"--pixel-size must be a positive number of Å, got {wanted:g}")
    try:
        table = _read(path, args, poses, None)
    except CryoaceInputError as exc:
        if "give the pixel size explicitly" not in str(exc):
            raise
        if wanted is None:
            raise CryoaceInputError(str(exc).replace("give the pixel size explicitly",
                                                     "give it with --pixel-size")) from None
        return _read(path, args, poses, wanted)
    if wanted is None:
        return table
    own = table.pixel_size
    if np.allclose(own, wanted, rtol=PIXEL_SIZE_RTOL, atol=0):
        return table
    low, high = float(np.min(own)), float(np.max(own))
    theirs = f"{low:.6g} Å/px" if low == high else f"{low:.6g} to {high:.6g} Å/px"
    note(f"--pixel-size {wanted:g} Å/px replaces the {theirs} of {path}")
    # read again: shifts stored in pixels are converted to Å with the pixel size that is used
    return _read(path, args, poses, wanted)


def open_particle_table(args: argparse.Namespace, path: str | Path, poses: str | Path | None = None,
                        note: Callable[[str], None] | None = None):
    """The :class:`~cryoace.io.table.ParticleTable` of ``path`` as the particle-input options ask.

    ``path`` is a RELION .star, a cryoSPARC .cs or an .mrcs stack (with ``args.ctf`` and ``poses``,
    cryoDRGN pickles). ``args.pixel_size`` is used where the file has none and replaces the file's
    otherwise (``note`` is told when they differ; default: one line on stderr). ``args.datadir`` (if
    the command has it) locates the stacks of star/.cs files. The rows are then selected by
    ``args.ind`` (in the index file's order) and cut to ``args.first``.
    """
    import numpy as np

    path = Path(path)
    first = getattr(args, "first", None)
    if first is not None and first <= 0:
        raise CryoaceInputError(f"--first must be a positive number of particles, got {first}")
    table = _read_with_pixel_size(path, args, None if poses is None else Path(poses), note or _note_to_stderr(args))
    ind = getattr(args, "ind", None)
    if ind is not None:
        from ..io.cryodrgn import read_index_file

        table = table.subset(read_index_file(ind, len(table)))
    if first is not None and first < len(table):
        table = table.subset(np.arange(first))
    return table
