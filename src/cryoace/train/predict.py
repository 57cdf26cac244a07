"""Poses from a trained run: the encoder over every particle (batched, no_grad, constant memory).

:func:`predict_poses` is the one pose-prediction function (``cryoace reconstruct`` ends with it,
``cryoace predict-poses`` calls it). With the symmetric loss the encoder sees each image and its
180° rotation, both are rendered with the decoder, and the pose of the path with the smaller error
— mapped to the original frame, (D·R₂, −t₂) for the rotated path — is the prediction, exactly as
in training (:func:`cryoace.train.losses.compute_loss`); a multi-head encoder's hypotheses are all
rendered and the best-fitting one is the prediction. The encoder runs in eval mode (BatchNorm
running statistics). :func:`write_poses_star` writes them into a copy of the particle table
(every input column kept) as a RELION 3.1 star file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import CryoaceInputError
from ..io.columns import CHUNK_ROWS, row_chunks
from ..types import Pose
from .config import TrainConfig, load_config
from .losses import HalfDiscGrid, compute_loss
from .trainer import DataInfo, build_models, load_checkpoint_file

__all__ = ["TrainedRun", "load_run", "predict_poses", "pose_predictor", "spooled_poses", "write_poses_star",
           "write_poses", "stored_box_size", "open_particles"]


@dataclasses.dataclass
class TrainedRun:
    """A run's configuration, data description and trained models (eval mode, on ``device``)."""

    run_dir: Path
    config: TrainConfig
    data: DataInfo
    encoder: torch.nn.Module
    decoder: torch.nn.Module
    step: int


def load_run(run_dir: str | os.PathLike, device: torch.device | str = "cpu",
             checkpoint: str | os.PathLike | None = None) -> TrainedRun:
    """Rebuild the models of ``run_dir`` from ``config.yaml`` and ``checkpoints/last.pt`` (or ``checkpoint``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CryoaceInputError("run directory not found", run_dir)
    ckpt_path = Path(checkpoint) if checkpoint is not None else run_dir / "checkpoints" / "last.pt"
    if not ckpt_path.is_file():
        raise CryoaceInputError("no checkpoint in the run directory (expected checkpoints/last.pt); "
                                "is it a 'cryoace reconstruct' output?", ckpt_path)
    state = load_checkpoint_file(ckpt_path)
    config_path = run_dir / "config.yaml"
    config = load_config(config_path)[0] if config_path.is_file() else TrainConfig.from_dict(state["config"])
    data = DataInfo(**state["data"])
    encoder, decoder = build_models(config, data.image_size, data.pixel_size)
    encoder.load_state_dict(state["encoder"])
    decoder.load_state_dict(state["decoder"])
    device = torch.device(device)
    return TrainedRun(run_dir, config, data, encoder.to(device).eval(), decoder.to(device).eval(),
                      int(state["step"]))


def open_particles(path: str | os.PathLike, data: DataInfo, datadir=None, invert_contrast: bool = False,
                   table=None):
    """A ParticleDataset of ``path`` prepared like the run's training images: Fourier-cropped to the
    run's box, normalized with the run's mean and std. The pixel size must match the run's."""
    from ..io.particles import ParticleDataset, read_particles

    table = read_particles(path, datadir=datadir) if table is None else table
    dataset = ParticleDataset(table, downsample=data.image_size, invert_contrast=invert_contrast,
                              normalize=False)
    ps = dataset.pixel_size
    if not np.isclose(ps, data.pixel_size, rtol=1e-3):
        raise CryoaceInputError(f"at the run's box of {data.image_size} px these images have "
                                f"{ps:.4g} Å/px, but the run was trained at {data.pixel_size:.4g} Å/px", path)
    dataset.normalize = True
    dataset.norm_mean, dataset.norm_std = data.norm_mean, data.norm_std
    return dataset


@torch.no_grad()
def predict_poses(encoder: torch.nn.Module, decoder, dataset, symmetric: bool = True, use_ctf: bool = True,
                  batch_size: int = 256, device: torch.device | str = "cpu", progress: bool = False,
                  radius_cyc_px: float = 0.5) -> Pose:
    """Poses (float64, on the CPU) of every particle of ``dataset``, in table order.

    symmetric : pick the better of the direct and the 180°-rotated path (the run's ``--loss symmetric``);
                False uses the direct path only.
    use_ctf   : apply the CTF when rendering (for the symmetric choice and a multi-head encoder's).
    radius_cyc_px : the band where the two paths are compared (the run's final loss band).
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    was = encoder.training, getattr(decoder, "training", False)
    encoder.eval()
    if isinstance(decoder, torch.nn.Module):
        decoder.eval()
    grid = HalfDiscGrid(dataset.image_size, device=device, radius_cyc_px=radius_cyc_px)
    use_ctf = use_ctf and dataset.has_ctf
    multi_head = getattr(encoder, "n_heads", 1) > 1
    n = len(dataset)
    rotmat = torch.empty(n, 3, 3, dtype=torch.float64)
    shift = torch.empty(n, 2, dtype=torch.float64)
    try:
        for batch in tqdm(dataset.batches(batch_size), desc="predicting poses", unit="batch",
                          disable=None if progress else True, leave=False):
            images = batch.images.to(device)
            ctf = batch.ctf.to(device=device) if use_ctf else None
            if symmetric or multi_head:  # a choice between paths or hypotheses: render them
                pose = compute_loss(encoder, decoder, images, batch.pixel_size.to(device), grid, ctf,
                                    loss="symmetric" if symmetric else "l2").pose
            else:
                pose = encoder(images)
            rows = batch.index
            rotmat[rows] = pose.rotmat.double().cpu()
            shift[rows] = pose.shift_angst.double().cpu()
    finally:
        encoder.train(was[0])
        if isinstance(decoder, torch.nn.Module):
            decoder.train(was[1])
    return Pose(rotmat=rotmat, shift_angst=shift)


def pose_predictor(encoder: torch.nn.Module, decoder, dataset, **options) -> Callable[[np.ndarray], Pose]:
    """rows → the :func:`predict_poses` poses of those rows of ``dataset`` (``options`` as there).

    For :func:`write_poses_star`, which calls it chunk by chunk, so the poses of millions of
    particles are never all in memory."""
    return lambda rows: predict_poses(encoder, decoder, dataset.subset(rows), **options)


_SPOOL_COLUMNS = 11  # rotmat (9) and shift_angst (2), float64


@contextlib.contextmanager
def spooled_poses(pose_of_rows: Callable[[np.ndarray], Pose], n: int, chunk_rows: int = CHUNK_ROWS,
                  directory: str | os.PathLike | None = None,
                  progress: bool = False) -> Iterator[Callable[[np.ndarray], Pose]]:
    """Run ``pose_of_rows`` over every chunk of ``row_chunks(n, chunk_rows)`` first (a progress bar
    of particles with ``progress``), keeping the poses in an anonymous temporary file in
    ``directory`` (88 bytes per particle, float64: exact), then give a function that reads the poses
    of consecutive rows back.

    Why: predicting a chunk of poses allocates large, short-lived tensors; formatting star text in
    between (the writer's chunks) leaves small long-lived objects among them, and the C heap then
    fragments and grows with the number of chunks (+25 % peak RSS over 10⁶ particles). Predicting
    everything first, then writing, keeps the peak flat in the number of particles."""
    from tqdm.auto import tqdm

    with tempfile.TemporaryFile(dir=directory, prefix=".cryoace-poses-") as spool:
        with tqdm(total=n, desc="predicting poses", unit="particle", disable=None if progress else True) as bar:
            for start, stop in row_chunks(n, chunk_rows):
                pose = pose_of_rows(np.arange(start, stop, dtype=np.int64))
                if len(pose.rotmat) != stop - start:
                    raise ValueError(f"the pose source gave {len(pose.rotmat)} poses for {stop - start} rows")
                block = torch.cat([pose.rotmat.reshape(-1, 9), pose.shift_angst.reshape(-1, 2)], dim=1)
                spool.write(block.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
                bar.update(stop - start)
        spool.flush()
        width = _SPOOL_COLUMNS * 8

        def read(rows: np.ndarray) -> Pose:
            rows = np.asarray(rows, dtype=np.int64)
            if len(rows) and not np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
                raise ValueError("spooled poses are read in runs of consecutive rows")
            spool.seek(int(rows[0]) * width if len(rows) else 0)
            raw = spool.read(len(rows) * width)
            block = torch.from_numpy(np.frombuffer(raw, dtype=np.float64).reshape(-1, _SPOOL_COLUMNS).copy())
            return Pose(rotmat=block[:, :9].reshape(-1, 3, 3), shift_angst=block[:, 9:])

        yield read


def write_poses_star(path: str | os.PathLike, table, pose: Pose | Callable[[np.ndarray], Pose],
                     columns: dict[str, np.ndarray] | None = None, chunk_rows: int = CHUNK_ROWS,
                     progress: bool = False) -> None:
    """Write ``table`` with its poses replaced by ``pose`` (RELION 3.1, every other column kept,
    atomically): a Pose of every row, or a function of row chunks such as :func:`pose_predictor`'s,
    which is run over every chunk before the file is written (:func:`spooled_poses`; ``progress``:
    a progress bar of that). ``columns``: per-particle columns to write too (see
    :func:`cryoace.io.star.write_star`)."""
    from ..io.star import write_star

    # the poses go to write_star directly: it streams the table's other columns chunk by chunk
    if isinstance(pose, Pose):
        write_star(path, table, pose=Pose(rotmat=pose.rotmat.double(), shift_angst=pose.shift_angst.double()),
                   columns=columns, chunk_rows=chunk_rows)
        return
    from ..io.atomic import naming

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)  # the spool lives beside the output
        with spooled_poses(pose, len(table), chunk_rows, directory=Path(path).parent, progress=progress) as spooled:
            write_star(path, table, pose=spooled, columns=columns, chunk_rows=chunk_rows)
    except OSError as exc:
        if exc.filename is not None:  # write_star's own errors name the output already
            raise
        raise naming(exc, path) from exc  # the anonymous spool beside it (a full disk)


#: pose file formats by suffix: RELION star, cryoSPARC .cs, cryoDRGN pose pickle
POSE_SUFFIXES = (".star", ".cs", ".pkl")


def stored_box_size(table) -> int:
    """The stored images' box (px) of ``table``: its ``image_size`` column, else the first stack's header."""
    if table.image_size is not None and len(table.image_size):
        sizes = np.unique(np.asarray(table.image_size))
        if len(sizes) > 1:
            raise CryoaceInputError(f"the particles have several box sizes ({', '.join(map(str, sizes))} px); "
                                    "a cryoDRGN pose pickle needs one", table.source)
        return int(sizes[0])
    if table.image_paths is None:
        raise CryoaceInputError("no box size: the file names no images and no rlnImageSize", table.source)
    from ..io.mrc import open_mrc

    return int(open_mrc(table.stack_paths[0], mmap=True).data.shape[-1])


def write_poses(path: str | os.PathLike, table, pose: Pose | Callable[[np.ndarray], Pose],
                chunk_rows: int = CHUNK_ROWS, progress: bool = False) -> None:
    """Write poses in the format of ``path``'s suffix: ``.star`` (:func:`write_poses_star`, every input
    column kept), ``.cs`` (cryoSPARC, :func:`cryoace.io.cryosparc.write_cs`) or ``.pkl`` (cryoDRGN's
    ``(rotations, shifts / box)``, :func:`cryoace.io.cryodrgn.write_cryodrgn_poses`, at the stored
    box and pixel size). ``pose`` as for :func:`write_poses_star`; a function of row chunks is run
    into a spool first (the .cs and .pkl writers need every pose at once: 88 bytes per particle)."""
    suffix = Path(path).suffix.lower()
    if suffix not in POSE_SUFFIXES:
        raise CryoaceInputError(f"unknown pose file type {suffix or '(none)'!r}: give a .star (RELION), "
                                ".cs (cryoSPARC) or .pkl (cryoDRGN) file name", path)
    if suffix == ".star":
        write_poses_star(path, table, pose, chunk_rows=chunk_rows, progress=progress)
        return
    if not isinstance(pose, Pose):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with spooled_poses(pose, len(table), chunk_rows, directory=Path(path).parent, progress=progress) as read:
            pose = read(np.arange(len(table), dtype=np.int64))
    if suffix == ".cs":
        from ..io.cryosparc import write_cs

        write_cs(path, table, pose)
    else:
        from ..io.cryodrgn import write_cryodrgn_poses

        write_cryodrgn_poses(path, pose, stored_box_size(table), table.pixel_size)
