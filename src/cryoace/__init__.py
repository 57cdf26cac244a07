"""cryoace — amortized ab initio cryo-EM reconstruction (cryoAI, ACE-EM) in PyTorch.

Subpackages: ``physics`` (image formation), ``io`` (file formats), ``reconstruct`` (backprojection),
``evaluate`` (FSC and metrics), ``cli`` (the ``cryoace`` command).
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("cryoace")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from . import errors, types  # noqa: E402,F401
from .errors import CryoaceInputError  # noqa: E402,F401
from .types import CTFParams, ParticleBatch, Pose  # noqa: E402,F401
