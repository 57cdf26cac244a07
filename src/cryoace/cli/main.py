"""Entry point of the ``cryoace`` command: dispatches to one module per sub-command.

Each sub-command module has a docstring (first line = summary, the rest = --help description with an
example), ``add_args(parser)`` and ``main(args)``. Input errors become one line on stderr and exit 2;
a run that fails on good input (training diverged) one line and exit 3; an interrupt exit 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from ..errors import EXIT_INPUT, EXIT_RUN_FAILED, CryoaceInputError, CryoaceRunError

# sub-command name -> module under cryoace.cli (imported lazily so `cryoace --help` is fast)
COMMANDS = {
    "align": "align",
    "backproject": "backproject",
    "demo": "demo",
    "evaluate": "evaluate",
    "fsc": "fsc",
    "mask": "mask",
    "molmap": "molmap",
    "predict-poses": "predict_poses",
    "reconstruct": "reconstruct",
    "report": "report",
    "simulate": "simulate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryoace",
        description="Amortized ab initio cryo-EM reconstruction (cryoAI / ACE-EM).",
        epilog="Run 'cryoace <command> --help' for the options and an example of each command.")
    parser.add_argument("--version", action="version", version=f"cryoace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"{__package__}.{module_name}")
        doc = (module.__doc__ or "").strip()
        summary = doc.splitlines()[0] if doc else name
        p = sub.add_parser(name, help=summary, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_args(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._main(args) or 0)
    except CryoaceInputError as exc:
        print(f"cryoace {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except CryoaceRunError as exc:  # good input, failed run (e.g. the loss diverged)
        print(f"cryoace {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except KeyboardInterrupt:
        print(f"cryoace {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
