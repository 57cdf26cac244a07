"""Defaults shared by the library and the command line's ``--help``. This module imports nothing, so
building a sub-command's parser loads neither numpy nor torch."""

#: Rows handled at once by chunked readers, writers and checks (bounds their transient memory).
CHUNK_ROWS = 1 << 13

#: ``make_mask``'s default dilation and soft-edge width (voxels).
MASK_EXTEND_PX = 3.0
MASK_SOFT_PX = 6.0

#: the names a run's settings choose from, where the command line lists them (``--help`` must not
#: import the modules that implement them, which load torch). Each owner checks its own against these.
PRELOAD_MODES = ("auto", "gpu", "ram", "none")     # values of --preload (cryoace.io.preload)
#: --loss: cryoAI's symmetric loss, plain L2, ACE-EM's generalized symmetric loss (cryoace.train.losses)
LOSSES = ("symmetric", "l2", "gsym")
PRECISIONS = ("auto", "fp32", "bf16")               # values of --precision (cryoace.train.precision)
DECODER_NAMES = ("fouriernet", "siren", "relu-pe", "voxel-fourier", "voxel-real")  # cryoace.models.decoders.DECODERS
