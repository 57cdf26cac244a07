"""Benchmark: training and pose-prediction throughput (images/s) per decoder and box size.

The images are synthetic (unit-variance noise with random CTFs) and already on the device, as with
``--preload gpu``: the figures measure the model (encoder, decoder, physics, loss, Adam), not disk
reads (bench/memory.py covers reading). Training runs ``Trainer.train_step`` (symmetric loss,
precision and channels_last at the run defaults: bf16 + NHWC on CUDA, fp32 on the CPU); inference
runs :func:`cryoace.train.predict.predict_poses` (symmetric path choice, no gradients). Decoders are
every name :func:`cryoace.models.build_decoder` knows at run time; one that fails to build is
recorded as skipped with the reason. Targets (H100, L = 128, CUDA only) are printed beside the
figures. Writes bench/results/throughput_<device>.json.

    python bench/throughput.py                        # CUDA if present: paper preset, L = 64 and 128
    python bench/throughput.py --device cpu --steps 3 --sizes 64 128
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

#: (decoder family, what) -> images/s on an H100 at L = 128 (the issue's targets)
TARGETS = {("fouriernet", "train"): 5000, ("voxel", "train"): 20000, ("any", "predict"): 50000}


def target(decoder: str, what: str, size: int, device: torch.device) -> int | None:
    if device.type != "cuda" or size != 128:
        return None
    if what == "predict":
        return TARGETS[("any", "predict")]
    family = "voxel" if decoder.startswith("voxel") else decoder
    return TARGETS.get((family, what))


class SyntheticDataset:
    """``n`` noise images of ``size`` px with random CTFs, held on ``device`` (the Trainer's and
    predict_poses' dataset interface: len, indexing by rows, batches, image and CTF description)."""

    has_ctf = True
    has_pose = False
    in_memory = True
    norm_mean, norm_std = 0.0, 1.0

    def __init__(self, n: int, size: int, device: torch.device, pixel_size: float = 2.0):
        from cryoace.types import CTFParams

        g = torch.Generator().manual_seed(0)
        self.n, self.image_size, self.pixel_size = n, size, pixel_size
        self.images = torch.randn(n, size, size, generator=g).to(device)
        defocus = 10000.0 + 5000.0 * torch.rand(n, generator=g)
        self.ctf = CTFParams.create(defocus_u=defocus, defocus_v=defocus + 100.0, defocus_angle=0.3,
                                    dtype=torch.float32)
        self.table = type("Table", (), {"source": Path("synthetic"), "pose": None})()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows):
        from cryoace.types import ParticleBatch

        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        return ParticleBatch(images=self.images[rows.to(self.images.device)],
                             pixel_size=torch.full((len(rows),), self.pixel_size), ctf=self.ctf[rows], index=rows)

    def batches(self, batch_size: int, **kwargs):
        from cryoace.io.particles import BatchIterable

        return BatchIterable(self, batch_size, False, None, None, False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(decoder: str, size: int, args, device: torch.device, workdir: Path) -> dict:
    from cryoace.train.config import preset_config
    from cryoace.train.predict import predict_poses
    from cryoace.train.trainer import Trainer

    cfg = preset_config(args.preset)
    cfg = dataclasses.replace(cfg, device=str(device), steps=10 ** 9, tensorboard=False, compile=args.compile,
                              batch_size=args.batch_size or cfg.batch_size)
    cfg.decoder.name = decoder
    batch = cfg.batch_size
    n = max(batch * (args.warmup + args.steps), args.predict_images)
    data = SyntheticDataset(n, size, device)
    row = {"decoder": decoder, "L": size, "batch": batch, "preset": args.preset}
    try:
        trainer = Trainer(cfg, data, workdir / f"{decoder}_{size}", progress=False)
    except Exception as exc:  # e.g. a decoder another engineer is still adding
        return {**row, "skipped": f"{type(exc).__name__}: {exc}"}
    row["precision"] = "bf16" if trainer.autocast_dtype is not None else "fp32"
    batches = [data[np.arange(i * batch, (i + 1) * batch)] for i in range(args.warmup + args.steps)]
    for b in batches[:args.warmup]:
        trainer.train_step(b)
    sync(device)
    start = time.perf_counter()
    for b in batches[args.warmup:]:
        trainer.train_step(b)
    sync(device)
    row["train_images_per_s"] = args.steps * batch / (time.perf_counter() - start)

    predict = SyntheticDataset(args.predict_images, size, device)
    kwargs = dict(symmetric=True, use_ctf=True, batch_size=args.predict_batch, device=device)
    predict_poses(trainer.encoder, trainer.decoder, SyntheticDataset(args.predict_batch, size, device),
                  **kwargs)  # warm-up
    sync(device)
    start = time.perf_counter()
    predict_poses(trainer.encoder, trainer.decoder, predict, **kwargs)
    sync(device)
    row["predict_images_per_s"] = len(predict) / (time.perf_counter() - start)
    row["predict_batch"] = args.predict_batch
    row["train_target"] = target(decoder, "train", size, device)
    row["predict_target"] = target(decoder, "predict", size, device)
    return row


def main() -> None:
    from cryoace.models.decoders import DECODERS
    from cryoace.runtime import resolve_device

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--decoders", nargs="+", default=None, help="default: every registered decoder")
    parser.add_argument("--preset", default=None, help="encoder/decoder widths (default: paper on CUDA, cpu on CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 50 CUDA, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 CUDA, 1 CPU)")
    parser.add_argument("--predict-images", type=int, default=None, help="default 65536 CUDA, 256 CPU")
    parser.add_argument("--predict-batch", type=int, default=None, help="default 1024 CUDA, 128 CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks (as --compile)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.preset = args.preset or ("paper" if cuda else "cpu")
    args.steps = args.steps or (50 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    args.predict_images = args.predict_images or (65536 if cuda else 256)
    args.predict_batch = args.predict_batch or (1024 if cuda else 128)
    decoders = args.decoders or list(DECODERS)
    rows = []
    print(f"{'decoder':>14} {'L':>4} {'train img/s':>12} {'target':>8} {'predict img/s':>14} {'target':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for decoder in decoders:
                row = measure(decoder, size, args, device, Path(tmp))
                rows.append(row)
                if "skipped" in row:
                    print(f"{decoder:>14} {size:>4} skipped: {row['skipped'][:80]}")
                    continue
                fmt = lambda v: "-" if v is None else f"{v:,.0f}"  # noqa: E731
                print(f"{decoder:>14} {size:>4} {fmt(row['train_images_per_s']):>12} {fmt(row['train_target']):>8} "
                      f"{fmt(row['predict_images_per_s']):>14} {fmt(row['predict_target']):>8}")
    note = ("synthetic images already on the device (like --preload gpu); targets apply to an H100 at L=128"
            + ("" if cuda else "; CPU figures with small step counts, for reference only"))
    targets = {f"{k[0]}/{k[1]}": v for k, v in TARGETS.items()}
    path = write_result("throughput", device, {"preset": args.preset, "steps": args.steps, "warmup": args.warmup,
                                               "note": note, "targets": targets, "runs": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
