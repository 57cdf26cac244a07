"""Pure, batched, differentiable image-formation physics (no nn.Parameters).

Conventions (docs/conventions.md §1): images (..., y, x), volumes (..., z, y, x); real-space centre at index L//2;
frequencies in cycles/px from ``torch.fft.fftfreq``; ``R`` maps volume to image coordinates and the
central slice samples ``V̂(Rᵀk)``; shifts are RELION origins (image = projection translated by −t).
"""
