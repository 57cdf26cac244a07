"""Simulation: atomic model → map (:mod:`.molmap`, gemmi) and map → particle dataset
(:mod:`.particles`, through :mod:`cryoace.physics.forward`), with named presets (:mod:`.presets`)."""
