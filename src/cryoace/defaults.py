"""Defaults shared by the library and the command line's ``--help``. This module imports nothing, so
building a sub-command's parser loads neither numpy nor torch."""

#: Rows handled at once by chunked readers, writers and checks (bounds their transient memory).
CHUNK_ROWS = 1 << 13

#: ``make_mask``'s default dilation and soft-edge width (voxels).
MASK_EXTEND_PX = 3.0
MASK_SOFT_PX = 6.0
