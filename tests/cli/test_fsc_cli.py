"""Tests of the ``cryoace fsc`` command (in-process through the dispatcher, and once as a subprocess)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cryoace.cli.main as cli_main
from cryoace.io.mrc import read_volume, write_mrc
from cryoace.physics.fourier import fft3_centered, ifft3_centered, radial_shell_index

from conftest import TEST_DATA  # noqa: E402

ADK_L64 = TEST_DATA / "volumes" / "adk_open_4ake_L64_1.5A.mrc"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _other_commands_import() -> bool:
    """The dispatcher imports every registered command to build --help; while a sibling command is
    still being written, it may not import yet. That must not hide failures of ``fsc`` itself."""
    try:
        for name in cli_main.COMMANDS.values():
            importlib.import_module(f"cryoace.cli.{name}")
    except ImportError:
        return False
    return True


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run ``cryoace <argv>`` in-process; returns (exit code, stdout, stderr)."""
    if not _other_commands_import():
        monkeypatch.setattr(cli_main, "COMMANDS", {"fsc": "fsc"})

    def run(*argv) -> tuple[int, str, str]:
        rc = cli_main.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def _lowpass(vol: np.ndarray, max_shell: int) -> np.ndarray:
    keep = radial_shell_index(vol.shape[-1], 3) <= max_shell
    return ifft3_centered(fft3_centered(torch.from_numpy(vol.copy())) * keep).real.numpy()


@pytest.fixture(scope="module")
def maps(tmp_path_factory) -> dict[str, Path]:
    """ADK (L=64, 1.5 Å) and a copy low-passed at shell 16 (6 Å); a 32-box map; a voxel-size-0 copy."""
    d = tmp_path_factory.mktemp("fsc_maps")
    adk = read_volume(ADK_L64)
    paths = {name: d / f"{name}.mrc" for name in ("a", "b", "small", "novs", "otherpix", "mask", "ones")}
    write_mrc(paths["a"], adk.data, adk.voxel_size)
    write_mrc(paths["b"], _lowpass(adk.data, 16), adk.voxel_size)
    write_mrc(paths["small"], adk.data[16:48, 16:48, 16:48], adk.voxel_size)
    write_mrc(paths["novs"], _lowpass(adk.data, 16), 0.0)
    write_mrc(paths["otherpix"], adk.data, 2.0)
    write_mrc(paths["mask"], np.ones((32, 32, 32), np.float32), adk.voxel_size)
    write_mrc(paths["ones"], np.ones((64, 64, 64), np.float32), adk.voxel_size)
    return paths


def test_json_and_plot(run_cli, maps, tmp_path):
    out_json, out_png = tmp_path / "out" / "fsc.json", tmp_path / "fsc.png"
    rc, out, err = run_cli("fsc", maps["a"], maps["b"], "--json", out_json, "--plot", out_png)
    assert rc == 0, err
    d = json.loads(out_json.read_text())
    assert d["box_size"] == 64 and d["voxel_size"] == pytest.approx(1.5)
    assert len(d["curve"]) == 33 and d["mask"] is None
    res = d["resolution"]["0.5"]
    assert res["crossed"] and 16.0 <= res["shell"] <= 17.0
    assert res["angstrom"] == pytest.approx(res["px"] * 1.5)
    assert 64 / 17 * 1.5 <= d["resolution"]["0.143"]["angstrom"] <= 6.0
    assert out_png.read_bytes()[:8] == PNG_MAGIC
    assert "resolution at FSC 0.5:" in out and "resolution at FSC 0.143:" in out
    assert "Å" in out and "shell" in out.splitlines()[0]
    assert err == ""
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files left


def test_json_to_stdout_keeps_stdout_parseable(run_cli, maps):
    rc, out, err = run_cli("fsc", maps["a"], maps["a"], "--json", "-")
    assert rc == 0
    d = json.loads(out)
    np.testing.assert_allclose(d["curve"], 1.0, atol=1e-6)
    assert d["resolution"]["0.143"]["px"] == 2.0 and not d["resolution"]["0.143"]["crossed"]
    assert "resolution at FSC 0.143" in err  # the table moved to stderr


def test_all_ones_mask_equals_unmasked(run_cli, maps):
    _, plain, _ = run_cli("fsc", maps["a"], maps["b"], "--json", "-")
    rc, masked, _ = run_cli("fsc", maps["a"], maps["b"], "--mask", maps["ones"], "--json", "-")
    assert rc == 0
    plain, masked = json.loads(plain), json.loads(masked)
    np.testing.assert_allclose(masked["curve"], plain["curve"], atol=1e-6)
    assert masked["masked"] and masked["mask"] == str(maps["ones"])


def test_missing_voxel_size_uses_the_other_with_a_warning(run_cli, maps):
    rc, out, err = run_cli("fsc", maps["a"], maps["novs"], "--json", "-")
    assert rc == 0
    assert json.loads(out)["voxel_size"] == pytest.approx(1.5)
    assert len(err.splitlines()) >= 1 and "warning" in err.splitlines()[0]
    assert str(maps["novs"]) in err.splitlines()[0]


def test_no_voxel_size_anywhere_reports_pixels(run_cli, maps):
    rc, out, err = run_cli("fsc", maps["novs"], maps["novs"])
    assert rc == 0 and "warning" in err and "--pixel-size" in err
    assert "res (px)" in out.splitlines()[0] and "Å" not in out
    assert "resolution at FSC 0.5: 2.00 px (never drops below" in out
    rc, out, err = run_cli("fsc", maps["novs"], maps["novs"], "--pixel-size", "2.5", "--json", "-")
    assert rc == 0 and json.loads(out)["resolution"]["0.5"]["angstrom"] == pytest.approx(5.0) and "note" not in err


def test_old_voxel_size_option_still_works_with_a_note(run_cli, maps, capsys):
    """--voxel-size was renamed --pixel-size (as in every other command); the old name is hidden but
    accepted, with one line naming the new one."""
    rc, out, err = run_cli("fsc", maps["novs"], maps["novs"], "--voxel-size", "2.5", "--json", "-")
    assert rc == 0 and json.loads(out)["resolution"]["0.5"]["angstrom"] == pytest.approx(5.0)
    assert err.splitlines()[0] == "cryoace fsc: note: --voxel-size is now called --pixel-size"
    assert "note" not in "".join(err.splitlines()[1:])  # the rest is the table (--json - moves it)
    from cryoace.cli.main import main

    with pytest.raises(SystemExit):
        main(["fsc", "--help"])
    help_text = capsys.readouterr().out
    assert "--pixel-size" in help_text and "--voxel-size" not in help_text


@pytest.mark.parametrize("second,extra,culprit", [
    ("small", (), "small"),             # different box sizes
    ("otherpix", (), "otherpix"),       # different voxel sizes
    ("b", ("--mask", "MASK"), "mask"),  # mask of another box size
    ("missing", (), "missing"),         # no such file
])
def test_input_errors_are_one_line_exit_2_and_write_nothing(run_cli, maps, tmp_path, second,
                                                            extra, culprit):
    paths = dict(maps, missing=tmp_path / "missing.mrc")
    extra = [paths["mask"] if e == "MASK" else e for e in extra]
    out_json, out_png = tmp_path / "fsc.json", tmp_path / "fsc.png"
    rc, out, err = run_cli("fsc", maps["a"], paths[second], *extra, "--json", out_json,
                           "--plot", out_png)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cryoace fsc: error:")
    assert str(paths[culprit]) in lines[0]
    assert "Traceback" not in err
    assert not out_json.exists() and not out_png.exists()


def test_odd_box_is_rejected(run_cli, tmp_path, maps):
    odd = tmp_path / "odd.mrc"
    write_mrc(odd, np.zeros((63, 63, 63), np.float32), 1.5)
    rc, _, err = run_cli("fsc", odd, odd)
    assert rc == 2 and "odd" in err and str(odd) in err


def test_help_has_summary_and_example(run_cli):
    with pytest.raises(SystemExit) as exc:
        run_cli("fsc", "--help")
    assert exc.value.code == 0
    import cryoace.cli.fsc as module

    doc = module.__doc__.strip().splitlines()
    assert doc[0] and doc[1] == "" and any(line.startswith("Example:") for line in doc)


def test_subprocess_python_m_cryoace(maps, tmp_path):
    """The real entry point in a fresh interpreter (one run, to stay fast): a bad input gives exit 2
    and exactly one line on stderr, which only a separate process shows in full (no stray warnings)."""
    if _other_commands_import():
        prefix = [sys.executable, "-m", "cryoace"]
    else:  # a sibling command is still being written: same dispatcher, fsc registered alone
        prefix = [sys.executable, "-c", "import sys, cryoace.cli.main as m; m.COMMANDS = "
                  "{'fsc': 'fsc'}; raise SystemExit(m.main(sys.argv[1:]))"]
    out_json = tmp_path / "bad.json"
    bad = subprocess.run(prefix + ["fsc", str(maps["a"]), str(maps["small"]), "--json", str(out_json)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith("cryoace fsc: error:") and bad.stderr.count("\n") == 1
    assert str(maps["small"]) in bad.stderr and "box size" in bad.stderr
    assert "Traceback" not in bad.stderr and bad.stdout == "" and not out_json.exists()


def test_mask_applies_the_phase_randomization_correction(run_cli, maps, tmp_path):
    """Half maps = ADK low-passed at shell 16 + independent noise, and a tight mask: the masked FSC
    beyond shell 16 is inflated by the mask; the reported (corrected) curve is not, and the JSON holds
    all four curves."""
    from cryoace.evaluate.mask import make_mask

    adk = read_volume(maps["a"])
    signal = _lowpass(adk.data, 16)
    rng = np.random.default_rng(0)
    halves = []
    for name in ("h1", "h2"):
        halves.append(tmp_path / f"{name}.mrc")
        write_mrc(halves[-1], signal + rng.normal(0, 0.3 * adk.data.std(), signal.shape), adk.voxel_size)
    mask, _ = make_mask(adk.data, extend_px=0, soft_px=2)
    mask_path = tmp_path / "tight.mrc"
    write_mrc(mask_path, mask.numpy(), adk.voxel_size)
    png = tmp_path / "fsc.png"
    rc, out, err = run_cli("fsc", *halves, "--mask", mask_path, "--json", "-", "--plot", png)
    assert rc == 0, err
    d = json.loads(out)
    pr = d["phase_randomization"]
    assert d["masked"] and pr["randomize_from_shell"] is not None
    masked = np.array(pr["masked"]["curve"])
    corrected = np.array(d["curve"])
    assert masked[20:].mean() > corrected[20:].mean() + 0.2
    assert abs(corrected[20:].mean()) < 0.1
    assert "masked FSC corrected (phases randomized from shell" in err
    assert png.read_bytes()[:8] == PNG_MAGIC
