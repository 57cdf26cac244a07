"""Bad input through the real command line: one line on stderr naming the file and the problem, exit
status 2, no traceback, and nothing (not even a temporary file) left in the output directory.

Every case is a row of ``CASES``: (name, builder, expected text). A builder gets a :class:`Work` (an
empty input directory, an empty output directory, the test data) and returns the command line and
the file the message must name. The inputs are copies of real files from ``tests/data``, broken in
one way each. ``test_bad_input`` runs every case in-process through ``cryoace.cli.main.main``;
``test_bad_input_subprocess`` runs a few through ``python -m cryoace`` in fresh interpreters (started
together, to stay fast), where a traceback or a stray warning would show in full.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from cryoace.cli.main import main
from cryoace.evaluate.gold_standard import UNRESOLVED_EXIT_CODE
from cryoace.io.cryodrgn import write_cryodrgn_ctf, write_cryodrgn_poses
from cryoace.io.mrc import write_mrc
from cryoace.io.star import read_star

SIM = Path("particles") / "sim_aspire_spike_L64_ctf_clean"  # 100 particles, 64², 3 Å, poses + CTF
STACK_NAME = "particles_0_99.mrcs"
MAP = Path("volumes") / "adk_open_4ake_L64_1.5A.mrc"        # 64³, 1.5 Å


@dataclasses.dataclass
class Work:
    data: Path     # tests/data (read-only)
    inp: Path      # where a case builds its inputs
    out: Path      # the output directory; must stay empty

    # -- backproject inputs ---------------------------------------------------------------------
    def stack(self) -> Path:
        """A private copy of the simulated stack (so it may be broken)."""
        dst = self.inp / STACK_NAME
        shutil.copyfile(self.data / SIM / STACK_NAME, dst)
        return dst

    def star(self, edit: Callable[[dict], None] | None = None, name: str = "particles.star",
             n: int | None = None) -> Path:
        """The simulated star file (first ``n`` rows), edited by ``edit(blocks)``, beside a stack copy."""
        if not (self.inp / STACK_NAME).exists():
            self.stack()
        blocks = starfile.read(self.data / SIM / "particles.star", always_dict=True)
        if n is not None:
            blocks["particles"] = blocks["particles"].iloc[:n].copy()
        if edit is not None:
            edit(blocks)
        path = self.inp / name
        starfile.write(blocks, path)
        return path

    def bad_stack(self, data: np.ndarray, name: str) -> Path:
        """Write ``data`` as the stack ``name`` and particles.star (len(data) rows) pointing at it."""
        with mrcfile.new(self.inp / name) as mrc:
            mrc.set_data(data.astype(np.float32))
            mrc.set_image_stack()
            mrc.voxel_size = 3.0

        def point_at(blocks):
            p = blocks["particles"]
            p["rlnImageName"] = [f"{i + 1:06d}@{name}" for i in range(len(p))]
        self.star(point_at, n=len(data))
        return self.inp / name

    def backproject(self, particles: Path, *extra) -> list[str]:
        return ["backproject", str(particles), "-o", str(self.out / "map.mrc"), "--device", "cpu",
                *map(str, extra)]

    # -- fsc inputs -----------------------------------------------------------------------------
    def volume(self, name: str = "a.mrc", data: np.ndarray | None = None) -> Path:
        path = self.inp / name
        if data is None:
            shutil.copyfile(self.data / MAP, path)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile: "contains NaN values"
                write_mrc(path, data, 1.5)
        return path

    def fsc(self, map1: Path, map2: Path, *extra) -> list[str]:
        return ["fsc", str(map1), str(map2), "--json", str(self.out / "fsc.json"),
                "--plot", str(self.out / "fsc.png"), *map(str, extra)]


def _map_data(w: Work) -> np.ndarray:
    with mrcfile.open(w.data / MAP) as mrc:
        return np.array(mrc.data, dtype=np.float32)


def _drop(*columns):
    def edit(blocks):
        for key, block in blocks.items():
            blocks[key] = block.drop(columns=[c for c in columns if c in block.columns])
    return edit


def _set_first(column, value, block="particles"):
    def edit(blocks):
        blocks[block][column] = blocks[block][column].astype(object)
        blocks[block].loc[blocks[block].index[0], column] = value
    return edit


# -- builders: Work -> (argv, the file the message must name) -----------------------------------

def missing_particles(w):
    return w.backproject(w.inp / "nope.star"), w.inp / "nope.star"


def missing_stack(w):
    star = w.star(_set_first("rlnImageName", "000001@elsewhere.mrcs"))
    return w.backproject(star), w.inp / "elsewhere.mrcs"


def index_out_of_range(w):
    star = w.star(_set_first("rlnImageName", f"000500@{STACK_NAME}"))
    return w.backproject(star), w.inp / STACK_NAME


def truncated_stack(w):
    star = w.star()
    stack = w.inp / STACK_NAME
    with open(stack, "r+b") as fh:
        fh.truncate(stack.stat().st_size // 2)
    return w.backproject(star), stack


def no_image_column(w):
    star = w.star(_drop("rlnImageName"))
    return w.backproject(star), star


def no_angle_columns(w):
    star = w.star(_drop("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
    return w.backproject(star), star


def non_square_box(w):
    stack = w.bad_stack(np.zeros((4, 64, 62)), "nonsquare.mrcs")
    return w.backproject(w.inp / "particles.star"), stack


def odd_box(w):
    stack = w.bad_stack(np.zeros((4, 63, 63)), "odd.mrcs")
    return w.backproject(w.inp / "particles.star"), stack


def _poisoned_stack(value):
    def build(w):
        star = w.star()
        stack = w.inp / STACK_NAME
        with mrcfile.open(stack, mode="r+") as mrc:
            mrc.data[2, 10, 20] = value
        return w.backproject(star), stack
    return build


def non_numeric_angle(w):
    star = w.star(_set_first("rlnAngleRot", "abc"))
    return w.backproject(star), star


def ragged_row(w):
    star = w.star()
    lines = star.read_text().rstrip("\n").split("\n")
    lines[-1] = " ".join(lines[-1].split()[:-3])  # the last particle loses its last 3 values
    star.write_text("\n".join(lines) + "\n")
    return w.backproject(star), star


def zero_pixel_size(w):
    star = w.star(_set_first("rlnImagePixelSize", 0.0, block="optics"))
    return w.backproject(star), star


def no_pixel_size(w):
    star = w.star(_drop("rlnImagePixelSize"))
    return w.backproject(star), star


def garbage_star(w):
    star = w.inp / "garbage.star"
    star.write_text("this is not a star file\n\x00\x01 loop_ @@@ 1 2 3\n_rln\n")
    return w.backproject(star), star


def empty_star(w):
    star = w.inp / "empty.star"
    star.touch()
    return w.backproject(star), star


def image_size_mismatch(w):
    star = w.star(_set_first("rlnImageSize", 128, block="optics"))
    return w.backproject(star), w.inp / STACK_NAME


def _cryodrgn_pickles(w, n_poses=100, n_ctf=100):
    """cryoDRGN inputs for the simulated stack: poses and CTF pickles with n_poses / n_ctf rows."""
    table = read_star(w.data / SIM / "particles.star")
    stack = w.stack()
    poses, ctf = w.inp / "pose.pkl", w.inp / "ctf.pkl"
    write_cryodrgn_poses(poses, table.pose[torch.arange(n_poses)], 64, 3.0)
    write_cryodrgn_ctf(ctf, table.ctf[torch.arange(n_ctf)], 64, 3.0)
    return stack, poses, ctf


def cryodrgn_argv(w, stack, poses, ctf, *extra):
    return w.backproject(stack, "--poses", poses, "--ctf", ctf, *extra)


def cryodrgn_poses_count(w):
    stack, poses, ctf = _cryodrgn_pickles(w, n_poses=99)
    return cryodrgn_argv(w, stack, poses, ctf), poses


def cryodrgn_ctf_count(w):
    stack, poses, ctf = _cryodrgn_pickles(w, n_ctf=99)
    return cryodrgn_argv(w, stack, poses, ctf), ctf


def cryodrgn_no_poses(w):
    stack, _, ctf = _cryodrgn_pickles(w)
    return w.backproject(stack, "--ctf", ctf), stack


def fsc_missing_map(w):
    return w.fsc(w.volume(), w.inp / "missing.mrc"), w.inp / "missing.mrc"


def fsc_nan_map(w):
    data = _map_data(w)
    data[5, 6, 7] = np.nan
    return w.fsc(w.volume(), w.volume("nan.mrc", data)), w.inp / "nan.mrc"


def fsc_box_mismatch(w):
    return w.fsc(w.volume(), w.volume("small.mrc", _map_data(w)[16:48, 16:48, 16:48])), w.inp / "small.mrc"


def fsc_non_cubic(w):
    return w.fsc(w.volume(), w.volume("slab.mrc", _map_data(w)[:32])), w.inp / "slab.mrc"


def fsc_mask_shape(w):
    mask = w.volume("mask.mrc", np.ones((32, 32, 32), np.float32))
    return w.fsc(w.volume(), w.volume("b.mrc"), "--mask", mask), mask


def _reconstruct(w, particles, *extra) -> list[str]:
    return ["reconstruct", str(particles), "-o", str(w.out / "run"), "--preset", "tiny", "--steps", "2",
            "--device", "cpu", "--quiet", *map(str, extra)]


def _duplicated_column(w) -> Path:
    """The simulated star file with _aspireAmplitude renamed _rlnDefocusU (so that column is there twice)."""
    star = w.star()
    star.write_text(star.read_text().replace("_aspireAmplitude", "_rlnDefocusU"))
    return star


def duplicate_column(w):
    star = _duplicated_column(w)
    return w.backproject(star), star


def duplicate_column_reconstruct(w):
    star = _duplicated_column(w)
    return _reconstruct(w, star), star


def _cs_file(w, **fields) -> Path:
    """A cryoSPARC .cs for the simulated stack (poses from its star file); ``fields`` replace fields by
    name with (dtype, values) (a dtype with a shape makes a vector field)."""
    table = read_star(w.data / SIM / "particles.star")
    w.stack()
    n = len(table)
    rotvec = np.zeros((n, 3), np.float32)  # poses do not matter: these files are refused before use
    columns = {
        "blob/path": ("S64", np.array([STACK_NAME.encode()] * n)),
        "blob/idx": ("<u4", np.arange(n)),
        "blob/psize_A": ("<f4", np.full(n, 3.0)),
        "alignments3D/pose": (("<f4", (3,)), rotvec),
        "alignments3D/shift": (("<f4", (2,)), np.zeros((n, 2))),
    }
    columns.update(fields)
    data = np.zeros(n, dtype=[(k, *(d if isinstance(d, tuple) else (d,))) for k, (d, _) in columns.items()])
    for name, (_, values) in columns.items():
        data[name] = values
    path = w.inp / "particles.cs"
    with open(path, "wb") as fh:
        np.save(fh, data)
    return path


def cs_pose_as_text(w):
    n = 100
    path = _cs_file(w, **{"alignments3D/pose": ("S16", np.array([b"0.1 0.2 0.3"] * n))})
    return w.backproject(path), path


def cs_pose_wrong_shape(w):
    path = _cs_file(w, **{"alignments3D/pose": (("<f4", (2,)), np.zeros((100, 2)))})
    return w.backproject(path), path


def cs_blob_path_float(w):
    path = _cs_file(w, **{"blob/path": ("<f8", np.zeros(100))})
    return w.backproject(path), path


def _mode_99(path: Path) -> Path:
    with open(path, "r+b") as fh:  # word 4 of the header: the mode
        fh.seek(12)
        fh.write(np.int32(99).tobytes())
    return path


def mrc_mode_99_stack(w):
    star = w.star()
    return w.backproject(star), _mode_99(w.inp / STACK_NAME)


def mrc_mode_99_map(w):
    return w.fsc(w.volume(), _mode_99(w.volume("b.mrc"))), w.inp / "b.mrc"


def complex_stack(w):
    name = "complex.mrcs"
    w.bad_stack(np.zeros((4, 64, 64)), name)
    with mrcfile.new(w.inp / name, overwrite=True) as mrc:
        mrc.set_data(np.ones((4, 64, 64), np.complex64))
        mrc.set_image_stack()
    return w.backproject(w.inp / "particles.star"), w.inp / name


def device_tpu(w):
    return w.backproject(w.star(), "--device", "tpu"), None


def negative_max_time(w):
    return _reconstruct(w, w.star(), "--max-time", "-5m"), None


def negative_max_time_equals(w):
    return _reconstruct(w, w.star(), "--max-time=-5m"), None


def fsc_json_is_directory(w):
    target = w.inp / "fsc.json"
    target.mkdir()
    return ["fsc", str(w.volume()), str(w.volume("b.mrc")), "--json", str(target)], target


def mask_output_is_directory(w):
    target = w.inp / "mask.mrc"
    target.mkdir()
    return ["mask", str(w.volume()), "-o", str(target)], target


def demo_output_is_file(w):
    target = w.inp / "demo"
    target.write_text("not a folder\n")
    return ["demo", "-o", str(target), "--max-time", "1s"], target


def missing_stack_with_datadir(w):
    star = w.star()
    elsewhere = w.inp / "elsewhere"
    elsewhere.mkdir()
    return w.backproject(star, "--datadir", elsewhere), elsewhere / STACK_NAME


def stack_without_poses(w):
    return w.backproject(w.stack()), w.inp / STACK_NAME


#: (case name, builder, text the message must contain)
CASES = [
    ("missing_particles", missing_particles, "file not found"),
    ("missing_stack", missing_stack, "not found"),
    ("index_out_of_range", index_out_of_range, "asks for image 500"),
    ("truncated_stack", truncated_stack, "truncated"),
    ("no_image_column", no_image_column, "rlnImageName"),
    ("no_angle_columns", no_angle_columns, "no poses"),
    ("non_square_box", non_square_box, "not square"),
    ("odd_box", odd_box, "odd"),
    ("nan_pixel", _poisoned_stack(np.nan), f"particle 3 (image 3 of {STACK_NAME})"),  # both from 1
    ("inf_pixel", _poisoned_stack(np.inf), "NaN or Inf"),
    ("non_numeric_angle", non_numeric_angle, "column rlnAngleRot has a non-numeric"),
    ("ragged_row", ragged_row, "has 12 values but data_particles has 15 columns"),
    ("zero_pixel_size", zero_pixel_size, "pixel size is zero, negative or undefined (0 Å"),
    ("no_pixel_size", no_pixel_size, "no pixel size"),
    ("garbage_star", garbage_star, "STAR file"),
    ("empty_star", empty_star, "STAR file"),
    ("image_size_mismatch", image_size_mismatch, "image size 128"),
    ("cryodrgn_poses_count", cryodrgn_poses_count, "99 rows but the stack holds 100"),
    ("cryodrgn_ctf_count", cryodrgn_ctf_count, "99 rows but the stack"),
    ("cryodrgn_no_poses", cryodrgn_no_poses, "no poses"),
    ("fsc_missing_map", fsc_missing_map, "file not found"),
    ("fsc_nan_map", fsc_nan_map, "NaN or Inf"),
    ("fsc_box_mismatch", fsc_box_mismatch, "box size 32 differs from 64"),
    ("fsc_non_cubic", fsc_non_cubic, "cubic"),
    ("fsc_mask_shape", fsc_mask_shape, "mask box size 32"),
    ("duplicate_column", duplicate_column, "column _rlnDefocusU appears twice in data_particles"),
    ("duplicate_column_reconstruct", duplicate_column_reconstruct, "column _rlnDefocusU appears twice"),
    ("cs_pose_as_text", cs_pose_as_text, "field alignments3D/pose holds |S16 values, expected numbers"),
    ("cs_pose_wrong_shape", cs_pose_wrong_shape, "field alignments3D/pose has shape (2,), expected (3,)"),
    ("cs_blob_path_float", cs_blob_path_float, "field blob/path holds float64 values"),
    ("mrc_mode_99_stack", mrc_mode_99_stack, "unsupported MRC mode 99"),
    ("mrc_mode_99_map", mrc_mode_99_map, "unsupported MRC mode 99"),
    ("complex_stack", complex_stack, "unsupported complex-valued MRC mode 4"),
    ("device_tpu", device_tpu, "--device 'tpu' is not a device"),
    ("negative_max_time", negative_max_time, "argument --max-time: expected one argument"),
    ("negative_max_time_equals", negative_max_time_equals, "cannot read the duration '-5m'"),
    ("fsc_json_is_directory", fsc_json_is_directory, "is a directory"),
    ("mask_output_is_directory", mask_output_is_directory, "is a directory"),
    ("demo_output_is_file", demo_output_is_file, "not a directory"),
    ("missing_stack_with_datadir", missing_stack_with_datadir, "not in --datadir"),
    ("stack_without_poses", stack_without_poses, "give them with --poses"),
]
#: what a case's message must not say (an internal name, a hint that does not apply, a wrong culprit)
MUST_NOT_SAY = {
    "missing_stack": ["datadir="],
    "missing_stack_with_datadir": ["give it with --datadir", "datadir="],
    "cs_blob_path_float": ["0.0"],
    "stack_without_poses": ["rlnAngleRot"],
    "mrc_mode_99_stack": ["truncated"],
    "mrc_mode_99_map": ["truncated"],
}
BY_NAME = {name: (build, expected) for name, build, expected in CASES}

#: Cases also run through ``python -m cryoace`` (each a fresh interpreter that imports torch).
SUBPROCESS_CASES = ["truncated_stack", "fsc_nan_map", "complex_stack", "negative_max_time"]

def _make_work(data: Path, root: Path) -> Work:
    w = Work(data=data, inp=root / "in", out=root / "out")
    w.inp.mkdir()
    w.out.mkdir()
    return w


def _check(name: str, w: Work, culprit: Path, argv: list[str], rc: int, err: str,
           inputs_before: set[Path]) -> None:
    expected = BY_NAME[name][1]
    assert "Traceback" not in err, err
    assert rc == 2, f"exit status {rc}; stderr:\n{err}"
    assert sorted(w.out.iterdir()) == [], f"left in the output directory: {sorted(w.out.iterdir())}"
    assert set(w.inp.iterdir()) == inputs_before, "files appeared beside the inputs"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith(f"cryoace {argv[0]}: error: "), err
    assert culprit is None or str(culprit) in line, f"message does not name {culprit}: {line}"
    assert expected in line, f"message lacks {expected!r}: {line}"
    for wrong in MUST_NOT_SAY.get(name, []):
        assert wrong not in line.replace(str(w.inp), "INPUTS"), f"message says {wrong!r}: {line}"
    assert "Warning" not in err, err


@pytest.mark.parametrize("name", list(BY_NAME))
def test_bad_input(name, test_data, tmp_path, capsys):
    work = _make_work(test_data, tmp_path)
    argv, culprit = BY_NAME[name][0](work)
    before = set(work.inp.iterdir())
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a raw NumPy/mrcfile warning is not a message
        rc = _run_cli(argv)
    _, err = capsys.readouterr()
    _check(name, work, culprit, argv, rc, err, before)


def _run_cli(argv: list[str]) -> int:
    """``main(argv)``'s exit status, also when argparse ends it (usage errors exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


#: Controls: the builders' inputs before breaking them, which must work (so that each case above
#: breaks exactly one thing), and the output the case checks would have caught.
CONTROLS = {
    "star": lambda w: (w.backproject(w.star(), "--first", 8, "--quiet"), "map.mrc"),
    "cryodrgn": lambda w: (cryodrgn_argv(w, *_cryodrgn_pickles(w), "--first", 8, "--quiet"), "map.mrc"),
    "fsc": lambda w: (w.fsc(w.volume(), w.volume("b.mrc")), "fsc.json"),
}


@pytest.mark.parametrize("name", CONTROLS)
def test_unbroken_inputs_work(name, test_data, tmp_path, capsys):
    work = _make_work(test_data, tmp_path)
    argv, output = CONTROLS[name](work)
    assert main(argv) == 0, capsys.readouterr().err
    assert [p.name for p in work.out.iterdir() if not p.name.endswith(".png")] == [output]


@pytest.fixture(scope="module")
def subprocess_runs(test_data, tmp_path_factory) -> dict:
    """Every SUBPROCESS_CASES case run through ``python -m cryoace``, all started at once."""
    started = {}
    for name in SUBPROCESS_CASES:
        work = _make_work(test_data, tmp_path_factory.mktemp(name))
        argv, culprit = BY_NAME[name][0](work)
        proc = subprocess.Popen([sys.executable, "-m", "cryoace", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        started[name] = (work, argv, culprit, set(work.inp.iterdir()), proc)
    runs = {}
    for name, (work, argv, culprit, before, proc) in started.items():
        _, err = proc.communicate(timeout=120)
        runs[name] = (work, argv, culprit, before, proc.returncode, err)
    return runs


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_subprocess(name, subprocess_runs):
    work, argv, culprit, before, rc, err = subprocess_runs[name]
    _check(name, work, culprit, argv, rc, err, before)


# -- outputs that cannot be written: a read-only folder, a full disk ----------------------------
#
# Each command writes into a folder that refuses it; the message must be one "error:" line (the last
# on stderr, after any progress lines) naming the output and the problem, exit 2, and the folder must
# hold nothing afterwards: no partial output, no hidden temporary.

MODEL = Path("models") / "adk_open_4ake_chainA_mdanalysis.pdb"
FILLER = "filler.bin"


def _mount_tmpfs(path: Path, options: str) -> bool:
    """Mount a tmpfs at ``path`` (root only; False where mounting is not allowed, e.g. in a container)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def full_disk(tmp_path, monkeypatch) -> Path:
    """A folder on a file system with no space left: a small tmpfs filled up (as root), else a folder
    where every rename that would publish a finished file fails with ENOSPC."""
    folder = tmp_path / "full"
    if _mount_tmpfs(folder, "size=2m"):
        with open(folder / FILLER, "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
        yield folder
        subprocess.run(["umount", "-l", str(folder)], check=True)  # lazy: an in-process run may keep a handle
        return

    def no_space(src, dst, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "replace", no_space)
    monkeypatch.setattr(os, "rename", no_space)
    yield folder


@pytest.fixture
def read_only(tmp_path) -> Path:
    """A read-only folder: chmod for a user; a read-only tmpfs for root (whom modes do not stop)."""
    folder = tmp_path / "ro"
    if os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    elif _mount_tmpfs(folder, "ro,size=64k"):
        yield folder
        subprocess.run(["umount", "-l", str(folder)], check=True)  # lazy: an in-process run may keep a handle
    else:
        pytest.skip("root without the right to mount a read-only tmpfs: no read-only folder to test")


@pytest.fixture(scope="module")
def trained_run(test_data, tmp_path_factory) -> Path:
    """A 2-step run of the tiny preset (a checkpoint for predict-poses), in a folder whose name is not
    UTF-8 (bytes a file system allows and a report must survive)."""
    run = tmp_path_factory.mktemp("trained") / os.fsdecode(b"run_\xff\xfe")
    assert main(["reconstruct", str(test_data / SIM / "particles.star"), "-o", str(run), "--preset", "tiny",
                 "--steps", "2", "--device", "cpu", "--quiet"]) == 0
    return run


#: command -> argv writing into the folder ``out`` (``w`` has the inputs; ``run`` a trained run)
OUTPUT_COMMANDS = {
    "simulate": lambda w, out, run: ["simulate", str(w.data / MAP), "-o", str(out / "sim"), "-n", "4",
                                     "--snr-db", "-10", "--quiet", "--device", "cpu"],
    "backproject": lambda w, out, run: ["backproject", str(w.star()), "-o", str(out / "map.mrc"), "--first",
                                        "8", "--quiet", "--device", "cpu"],
    "backproject_half_maps": lambda w, out, run: ["backproject", str(w.star()), "-o", str(out / "map.mrc"),
                                                  "--first", "8", "--half-maps", "--quiet", "--device", "cpu"],
    "reconstruct": lambda w, out, run: ["reconstruct", str(w.star()), "-o", str(out / "run"), "--preset", "tiny",
                                        "--steps", "2", "--device", "cpu", "--quiet"],
    "mask": lambda w, out, run: ["mask", str(w.data / MAP), "-o", str(out / "mask.mrc")],
    "fsc": lambda w, out, run: ["fsc", str(w.data / MAP), str(w.data / MAP), "--json", str(out / "fsc.json")],
    "molmap": lambda w, out, run: ["molmap", str(w.data / MODEL), "-o", str(out / "adk.mrc"), "--box", "32",
                                   "--pixel-size", "3", "--resolution", "8"],
    "align": lambda w, out, run: ["align", str(w.data / MAP), "-r", str(w.data / MAP), "-o",
                                  str(out / "aligned.mrc"), "--no-search", "--no-plot"],
    "predict-poses": lambda w, out, run: ["predict-poses", str(run), str(w.star()), "-o", str(out / "poses.star"),
                                          "--device", "cpu", "--quiet"],
}


def _check_write_failure(argv: list[str], rc: int, err: str, out: Path, problems: tuple[str, ...]) -> None:
    assert "Traceback" not in err, err
    assert rc == 2, f"exit status {rc}; stderr:\n{err}"
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    line = errors[0]
    assert line.startswith(f"cryoace {argv[0]}: error: {out}"), f"does not name the output: {line}"
    assert any(p in line for p in problems), line
    left = sorted(p.relative_to(out) for p in out.rglob("*") if p.name != FILLER)
    assert left == [], f"left behind: {left}"


@pytest.fixture
def needed_run(request) -> Path | None:
    """The trained run when the case is predict-poses (made before the folder is broken)."""
    needs = request.node.callspec.params["name"] == "predict-poses"
    return request.getfixturevalue("trained_run") if needs else None


#: the folder fixture -> what the message must say
UNWRITABLE = {"full_disk": ("No space left on device",), "read_only": ("Read-only file system", "Permission denied")}


@pytest.mark.parametrize("folder", UNWRITABLE)
@pytest.mark.parametrize("name", OUTPUT_COMMANDS)
def test_unwritable_output_folder(name, folder, needed_run, test_data, tmp_path, capsys, request):
    out = request.getfixturevalue(folder)  # after needed_run: the trained run is written first
    work = _make_work(test_data, tmp_path)
    argv = OUTPUT_COMMANDS[name](work, out, needed_run)
    capsys.readouterr()
    rc = _run_cli(argv)
    _check_write_failure(argv, rc, capsys.readouterr().err, out, UNWRITABLE[folder])


def test_run_folder_with_a_non_utf8_name_has_a_report(trained_run, capsys):
    """reconstruct wrote report.html into a folder named with bytes that are not UTF-8, and
    ``cryoace report`` rewrites it (the name shown with U+FFFD)."""
    report = trained_run / "report.html"
    assert report.is_file()
    report.unlink()
    assert main(["report", str(trained_run)]) == 0, capsys.readouterr().err
    assert "run_\ufffd\ufffd" in report.read_text(encoding="utf-8")


# -- interruptions ---------------------------------------------------------------------------

def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_simulate_killed_leaves_no_partial_dataset(test_data, tmp_path, capsys):
    """kill -9 in the middle of ``simulate`` (a new folder, then an --overwrite of a finished one):
    the target holds no partial dataset and no temporary; the unfinished staging folder beside it
    is removed by the next run, which works."""
    target = tmp_path / "sim"
    base = ["simulate", str(test_data / MAP), "-o", str(target), "--snr-db", "-10", "--quiet", "--device", "cpu"]

    def killed(*extra) -> None:
        proc = subprocess.Popen([sys.executable, "-m", "cryoace", *base, "-n", "400000", *extra],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:  # wait until the stack is being written into the staging folder
            deadline = time.monotonic() + 120
            while not any(p.name.endswith(".tmp.mrcs") for p in tmp_path.glob(".sim.partial-*/*")):
                assert proc.poll() is None and time.monotonic() < deadline, "simulate did not start writing"
                time.sleep(0.2)
        finally:
            proc.kill()
            proc.wait()

    killed()
    assert not target.exists()
    assert len(list(tmp_path.glob(".sim.partial-*"))) == 1  # the killed run's, locked no more
    assert main([*base, "-n", "4"]) == 0
    assert list(tmp_path.glob(".sim.partial-*")) == [] and "killed runs" in capsys.readouterr().err
    first = (target / "particles.star").read_bytes()

    killed("--overwrite")
    assert (target / "particles.star").read_bytes() == first and _hidden(target) == []  # untouched
    assert main([*base, "-n", "6", "--overwrite"]) == 0
    assert list(tmp_path.glob(".sim.partial-*")) == [] and _hidden(target) == []
    assert len(read_star(target / "particles.star")) == 6


def test_second_writer_of_a_run_folder_is_refused(test_data, tmp_path, capsys):
    """While a process holds a run folder (here: this one, through the same lock), reconstruct into
    it is refused with one line naming the folder and the holder; the lock goes with its holder."""
    from cryoace.io.lock import folder_lock, is_locked

    run = tmp_path / "run"
    argv = ["reconstruct", str(test_data / SIM / "particles.star"), "-o", str(run), "--preset", "tiny",
            "--steps", "2", "--device", "cpu", "--quiet"]
    with folder_lock(run, "run directory"):
        assert main(argv) == 2
        assert is_locked(run)
    err = capsys.readouterr().err.strip()
    assert err == (f"cryoace reconstruct: error: {run}: another cryoace process (pid {os.getpid()}) is writing "
                   "this run directory; wait for it to finish, or stop it first"), err
    assert not is_locked(run) and not run.exists()  # released, and the folder it made for nothing removed


def test_interrupted_run_has_no_final_looking_map_and_says_how_to_resume(test_data, tmp_path, capsys,
                                                                        monkeypatch):
    """Ctrl-C during the refinement stage: no volume.mrc (the decoder's map is volume_decoder.mrc),
    exit 130, and the message gives the exact command that continues; that command finishes the run."""
    import cryoace.pipeline.refine_stage as refine_stage

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(refine_stage, "refine", interrupted)
    run = tmp_path / "run"
    argv = ["reconstruct", str(test_data / SIM / "particles.star"), "-o", str(run), "--preset", "tiny",
            "--steps", "2", "--device", "cpu", "--quiet", "--refine", "--refine-rounds", "1",
            "--refine-step", "30", "--no-ab-initio"]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    command = f"cryoace {shlex.join([*argv, '--resume'])}"
    assert err[-1] == f"cryoace reconstruct: interrupted; continue with: {command}", err
    assert not (run / "volume.mrc").exists() and (run / "volume_decoder.mrc").is_file()

    monkeypatch.undo()
    # it finishes (2 training steps and 1 round leave the poses unfound: NOT RESOLVED, exit 4, is honest)
    assert main(shlex.split(command)[1:]) in (0, UNRESOLVED_EXIT_CODE), capsys.readouterr().err
    assert (run / "volume.mrc").is_file() and (run / "volume_decoder.mrc").is_file()
