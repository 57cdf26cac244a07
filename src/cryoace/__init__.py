"""cryoace — amortized ab initio cryo-EM reconstruction (cryoAI, ACE-EM) in PyTorch.

Subpackages: ``physics`` (image formation), ``io`` (file formats), ``reconstruct`` (backprojection, ab initio,
projection-matching refinement),
``evaluate`` (FSC and metrics), ``cli`` (the ``cryoace`` command). The most used names are also
available here, e.g. ``cryoace.read_particles``, ``cryoace.ParticleDataset``, ``cryoace.fsc``
(imported on first use, so ``import cryoace`` stays fast).
"""

from importlib import import_module as _import_module
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("cryoace")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from .errors import CryoaceInputError  # noqa: E402

# public name -> module that defines it (relative to this package); the types too, because they
# import torch, which `cryoace --help` / `--version` must not pay for
_LAZY = {
    "CTFParams": ".types", "ParticleBatch": ".types", "Pose": ".types",
    "read_particles": ".io.particles", "ParticleTable": ".io.particles", "ParticleDataset": ".io.particles",
    "read_star": ".io.star", "write_star": ".io.star", "read_cs": ".io.cryosparc",
    "read_volume": ".io.mrc", "open_mrc": ".io.mrc", "write_mrc": ".io.mrc",
    "compute_ctf": ".physics.ctf", "phase_ramp": ".physics.shift",
    "render_images": ".physics.forward", "render_spectra": ".physics.forward",
    "VoxelFourierVolume": ".physics.forward", "project_real_space": ".physics.projector",
    "FourierAccumulator": ".reconstruct.backproject",
    "ab_initio": ".reconstruct.ab_initio", "refine": ".reconstruct.refine",
    "fsc": ".evaluate.fsc", "FSCResult": ".evaluate.fsc",
    "masked_fsc": ".evaluate.fsc", "align_maps": ".evaluate.map_align", "make_mask": ".evaluate.mask",
    "check_contrast": ".io.contrast", "write_report": ".evaluate.report",
}

__all__ = ["__version__", "CryoaceInputError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(_import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'cryoace' has no attribute {name!r}")
