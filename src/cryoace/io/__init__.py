"""File formats: MRC/MRCS, RELION star, cryoSPARC .cs, cryoDRGN pickles, and the particle table."""
