"""The cryoace command: --version, one sub-command per job with a described --help and an example."""

import subprocess
import sys

import numpy as np
import pytest

import cryoace
from cryoace.cli.main import COMMANDS, main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"cryoace {cryoace.__version__}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help_with_example(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"cryoace {command}" in out and "Example:" in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "backproject" in capsys.readouterr().out


def test_console_script_and_module_agree():
    out = subprocess.run([sys.executable, "-m", "cryoace", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "backproject" in out.stdout and "fsc" in out.stdout


def test_missing_input_file_is_one_line_exit_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cryoace", "backproject", str(tmp_path / "nope.star"),
                          "-o", str(tmp_path / "map.mrc")], capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.star" in lines[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "map.mrc").exists()


def test_public_api_importable_from_package():
    """Every public name is the object of the module that defines it (not a stub or a copy), and the
    functions given the same input agree with their home module's."""
    import importlib

    for name in cryoace.__all__:
        obj = getattr(cryoace, name)
        home = getattr(obj, "__module__", None)
        if home is not None and home.startswith("cryoace."):
            assert getattr(importlib.import_module(home), obj.__name__) is obj, name
    assert cryoace.fsc.__module__ == "cryoace.evaluate.fsc"
    rng = np.random.default_rng(0)
    volume, other = rng.normal(size=(2, 16, 16, 16))
    assert np.allclose(cryoace.fsc(volume, volume).curve, 1.0)  # a map agrees with itself in every shell
    assert np.abs(cryoace.fsc(volume, other).curve[2:]).max() < 0.5  # ... and not with independent noise


_PROBE = ("import sys\nfrom cryoace.cli.main import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
          "    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)")


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["reconstruct", "--help"], ["mask", "--help"],
                                  ["predict-poses", "--help"], ["backproject", "--help"]])
def test_start_does_not_import_torch(argv):
    """`cryoace --version` / `--help` (and a sub-command's --help) load neither torch nor the other
    sub-commands: the start takes a fraction of a second, not seconds."""
    out = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "NO-TORCH"
    assert "cryoace" in out.stdout


def test_top_level_help_lists_every_command_with_its_summary(capsys):
    """The summaries are read from the modules' docstrings without importing them."""
    import importlib

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name, module_name in COMMANDS.items():
        summary = importlib.import_module(f"cryoace.cli.{module_name}").__doc__.strip().splitlines()[0]
        assert name in out and summary[:40] in " ".join(out.split())
