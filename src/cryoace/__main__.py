"""``python -m cryoace`` — the same as the ``cryoace`` command (so ``torchrun -m cryoace`` works)."""

from .cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
