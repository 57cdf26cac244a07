"""Reconstruction without a network: direct Fourier inversion with CTF (Wiener) weighting, pose
search, stochastic-EM ab initio and projection-matching refinement."""
