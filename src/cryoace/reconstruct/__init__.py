"""Reconstruction from known poses: direct Fourier inversion with CTF (Wiener) weighting."""
