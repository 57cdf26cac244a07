"""The ``cryoace`` command line: one module per sub-command, each with ``add_args`` and ``main``."""
