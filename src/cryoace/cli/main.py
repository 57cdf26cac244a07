"""Entry point of the ``cryoace`` command: dispatches to one module per sub-command.

Each sub-command module has a docstring (first line = summary, the rest = --help description with an
example), ``add_args(parser)`` and ``main(args)``, and may have ``resume_hint(args, argv)`` (the
command that continues after an interruption, see :func:`resume_command`). Input errors, unusable
options and failed reads or writes of the file system (a read-only folder, a full disk, a directory
given for a file) become one line on stderr and exit 2; a run that fails on good input (training
diverged) one line and exit 3; an interrupt exit 130.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import sys
from pathlib import Path

from .. import __version__
from ..errors import EXIT_INPUT, EXIT_RUN_FAILED, CryoaceInputError, CryoaceRunError

# sub-command name -> module under cryoace.cli (only the chosen one is imported: `cryoace --help` and
# `--version` import neither the sub-commands nor torch)
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
    "refine": "refine",
    "report": "report",
    "simulate": "simulate",
}


def _module_doc(module_name: str) -> str:
    """The docstring of sub-command module ``module_name``, read from its source without importing it
    (importing would run its imports: the top-level help must not import every command)."""
    spec = importlib.util.find_spec(f"{__package__}.{module_name}")
    source = Path(spec.origin).read_text(encoding="utf-8")
    return (ast.get_docstring(ast.parse(source, spec.origin)) or "").strip()


def _chosen_command(argv: list[str]) -> str | None:
    """The sub-command named in ``argv``: its first word that is not an option (the top-level
    options, --help and --version, take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


class _OneLineParser(argparse.ArgumentParser):
    """A sub-command parser whose usage errors are one line (the full usage is in --help)."""

    def error(self, message: str):
        if "expected one argument" in message:  # e.g. --max-time -5m: the value looks like an option
            message += " (for a value that starts with '-', write it as --option=VALUE)"
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _os_error_line(exc: OSError) -> str:
    """``PATH: problem`` for a failed read or write (the path when the error names one)."""
    problem = exc.strerror or str(exc)
    if exc.filename is None:
        return problem
    names = [os.fsdecode(exc.filename)] + ([os.fsdecode(exc.filename2)] if exc.filename2 is not None else [])
    return f"{' -> '.join(names)}: {problem}"


def resume_command(run_dir, argv: list[str]) -> str | None:
    """The command line that continues the run in ``run_dir`` (``argv`` with ``--resume``), or None
    when the run has no checkpoint to continue from."""
    import shlex

    from ..pipeline.run import has_checkpoint

    if not has_checkpoint(run_dir):
        return None
    return "cryoace " + shlex.join(argv if "--resume" in argv else [*argv, "--resume"])


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``cryoace`` parser. Only the sub-command named in ``argv`` is imported and gets its options
    (all of them when ``argv`` is None); the others are listed with their summary line only."""
    parser = argparse.ArgumentParser(
        prog="cryoace",
        description="Amortized ab initio cryo-EM reconstruction (cryoAI / ACE-EM).",
        epilog="Run 'cryoace <command> --help' for the options and an example of each command.")
    parser.add_argument("--version", action="version", version=f"cryoace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_OneLineParser)
    chosen = None if argv is None else _chosen_command(argv)
    for name, module_name in COMMANDS.items():
        if argv is None or name == chosen:
            module = importlib.import_module(f"{__package__}.{module_name}")
            doc = (module.__doc__ or "").strip()
        else:
            module, doc = None, _module_doc(module_name)
        summary = doc.splitlines()[0] if doc else name
        p = sub.add_parser(name, help=summary, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if module is not None:
            module.add_args(p)
            p.set_defaults(_main=module.main, _resume_hint=getattr(module, "resume_hint", None))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    # a file name that is not UTF-8 (kept by Python as surrogates) must not stop a message or a
    # "wrote ..." line: show such bytes escaped, as stderr does by default
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._main(args) or 0)
    except CryoaceInputError as exc:
        print(f"cryoace {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as exc:  # the file system refused a read or write (EACCES, ENOSPC, EROFS, EISDIR...)
        print(f"cryoace {args.command}: error: {_os_error_line(exc)}", file=sys.stderr)
        return EXIT_INPUT
    except CryoaceRunError as exc:  # good input, failed run (e.g. the loss diverged)
        print(f"cryoace {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except KeyboardInterrupt:
        hint = args._resume_hint(args, argv) if args._resume_hint is not None else None
        print(f"cryoace {args.command}: interrupted" + (f"; continue with: {hint}" if hint else ""),
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
