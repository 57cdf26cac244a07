"""ParticleTable and the lazy ParticleDataset: batched positional reads, downsampling, normalization,
pickling, and one test per kind of bad input."""

from __future__ import annotations

import pickle
import shutil
import sys
import threading

import mrcfile
import numpy as np
import pytest
import torch

from cryoace.errors import CryoaceInputError
from cryoace.io.cryodrgn import table_from_stack
from cryoace.io.mrc import open_mrc, write_mrc
from cryoace.io.particles import (
    ParticleDataset,
    ParticleTable,
    StackFile,
    collate_particles,
    no_ctf_params,
    read_particles,
)
from cryoace.io.star import read_star
from cryoace.physics.fourier import fourier_crop

R31 = "relion31_cryodrgn"
TRPV1 = "trpv1_cryojax"


def make_table(paths, indices, pixel_size=1.0, **kw) -> ParticleTable:
    n = len(indices)
    return ParticleTable(source=kw.pop("source", "test.star"), image_paths=np.asarray(paths, dtype=object),
                         image_indices=np.asarray(indices), pixel_size=np.full(n, pixel_size),
                         ctf=no_ctf_params(n), has_ctf=False, **kw)


def stack_file(tmp_path, data, name="s.mrcs", voxel=1.0):
    path = tmp_path / name
    write_mrc(path, np.asarray(data, dtype=np.float32), voxel_size=voxel)
    return path


def one_line_naming(err, *paths):
    msg = str(err.value)
    assert "\n" not in msg
    for p in paths:
        assert str(p) in msg, (p, msg)
    return msg


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------

def test_table_subset_and_remap(particles_dir):
    table = read_star(particles_dir / R31 / "relion31.6opticsgroups.star")
    sub = table.subset([5, 0, 138])
    assert len(sub) == 3
    assert list(sub.image_indices) == [table.image_indices[5], table.image_indices[0], table.image_indices[138]]
    torch.testing.assert_close(sub.pose.rotmat[0], table.pose.rotmat[5])
    torch.testing.assert_close(sub.ctf.defocus_u, table.ctf.defocus_u[[5, 0, 138]])
    assert sub.extra.iloc[2].equals(table.extra.iloc[138].rename(2))
    assert len(table.subset(slice(0, 10, 2))) == 5
    assert len(table.subset(np.arange(139) < 7)) == 7
    moved = table.remap_stacks({"0003_shiny.mrcs": "/elsewhere/a.mrcs"})
    assert moved.image_paths[0] == "/elsewhere/a.mrcs"
    assert sum(p == "/elsewhere/a.mrcs" for p in moved.image_paths) == sum(
        p.endswith("/0003_shiny.mrcs") for p in table.image_paths)


def test_table_validation(tmp_path):
    with pytest.raises(CryoaceInputError, match="counts do not match") as err:
        ParticleTable(source=tmp_path / "x.star", image_paths=np.array(["a", "b"], dtype=object),
                      image_indices=np.array([0, 1]), pixel_size=np.ones(3), ctf=no_ctf_params(3))
    one_line_naming(err, tmp_path / "x.star")
    for bad in (0.0, -1.0, np.nan):
        with pytest.raises(CryoaceInputError, match="pixel size") as err:
            make_table(["a"], [0], pixel_size=bad, source=tmp_path / "y.star")
        one_line_naming(err, tmp_path / "y.star")


# --------------------------------------------------------------------------------------------
# Reading images
# --------------------------------------------------------------------------------------------

def test_batches_match_the_stack_in_requested_order(particles_dir, tmp_path):
    """Two stacks interleaved, unsorted and repeated indices: same pixels as the raw memmaps."""
    a = particles_dir / TRPV1 / "trpv1_small_stack.mrcs"
    b = tmp_path / "copy.mrcs"
    raw_a = np.array(open_mrc(a).data)
    stack_file(tmp_path, raw_a[::-1] * 2, name="copy.mrcs")
    paths = [str(a), str(b)] * 10
    indices = list(range(10)) + list(range(10))
    indices = [indices[k // 2 + 10 * (k % 2)] for k in range(20)]
    ds = ParticleDataset(make_table(paths, indices, pixel_size=4.88), normalize=False)
    request = [19, 0, 7, 7, 2, 13]
    batch = ds[request]
    for k, row in enumerate(request):
        stack = raw_a if paths[row] == str(a) else raw_a[::-1] * 2
        np.testing.assert_array_equal(batch.images[k].numpy(), stack[indices[row]])
    assert batch.images.dtype == torch.float32 and batch.images.shape == (6, 48, 48)
    assert batch.index.tolist() == request and batch.index.dtype == torch.int64
    assert batch.pose is None
    assert len(ds.stack_paths) == 2


def test_memory_mapped_not_loaded(particles_dir):
    ds = ParticleDataset(read_particles(particles_dir / "sim_aspire_spike_L64_ctf_snr0.1/particles.star"))
    ds[[3, 1, 400]]
    arr = ds.stack_array(0)
    assert isinstance(arr, np.memmap) or isinstance(arr.base, np.memmap)
    # nothing in the dataset holds a full in-memory copy of the pixels
    big = [k for k, v in vars(ds).items() if isinstance(v, (np.ndarray, torch.Tensor))
           and v.nbytes >= 500 * 64 * 64 and not isinstance(v, np.memmap)]
    assert big == []
    assert len(pickle.dumps(ds)) < 200_000  # the 8 MB stack does not travel with the dataset


@pytest.mark.parametrize("dtype", [">f4", "<i2", "<f2"])
def test_stack_file_reads_what_mrcfile_reads(tmp_path, dtype):
    """Positional reads find the data block after an extended header, in the stored dtype and byte order."""
    data = np.random.default_rng(0).normal(0, 50, (37, 8, 8)).astype(dtype)
    path = tmp_path / "odd.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_extended_header(np.zeros(1234, dtype="V1"))
        mrc.set_data(data)
    assert mrcfile.open(path, header_only=True).header.nsymbt == 1234
    stack = StackFile(path)
    assert stack.shape == (37, 8, 8) and stack.offset == 1024 + 1234
    for indices in ([0], [36], [3, 4, 5, 9, 20, 21], np.arange(37), []):
        got = stack.read(np.asarray(indices, dtype=np.int64))
        np.testing.assert_array_equal(got, data[np.asarray(indices, dtype=np.int64)])
    table = make_table([str(path)] * 4, [5, 0, 36, 5])
    images = ParticleDataset(table, normalize=False)[[0, 1, 2, 3]].images.numpy()
    np.testing.assert_array_equal(images, data[[5, 0, 36, 5]].astype(np.float32))


def test_stack_file_shrunk_during_the_run(tmp_path):
    path = stack_file(tmp_path, np.ones((10, 8, 8)))
    stack = StackFile(path)
    with open(path, "r+b") as fh:
        fh.truncate(1024 + 5 * 8 * 8 * 4)
    with pytest.raises(CryoaceInputError, match="shorter than when it was opened") as err:
        stack.read(np.arange(4, 8))
    one_line_naming(err, path)


def test_concurrent_reads_from_two_threads(tmp_path):
    """The prefetch thread and the main thread read the same dataset (LRU of one open stack at a time)."""
    rng = np.random.default_rng(0)
    paths = [str(stack_file(tmp_path, rng.normal(size=(50, 8, 8)), name=f"s{k}.mrcs")) for k in range(3)]
    table = make_table([paths[k % 3] for k in range(150)], [k // 3 for k in range(150)])
    ds = ParticleDataset(table, normalize=False, max_open_stacks=1)
    rows = np.random.default_rng(1).integers(0, len(ds), (40, 16))
    expected = [ds[r].images for r in rows]
    results, errors = {}, []

    def work(k):
        try:
            results[k] = [ds[r].images for r in rows]
        except Exception as exc:  # noqa: BLE001 (reported by the assertion below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for got in results.values():
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_reading_every_image_leaves_resident_memory_flat(tmp_path):
    """A pass over the whole stack must not make its pages resident in this process (a memmap would:
    RssFile grows by the stack's size), so a run's RSS does not grow with the number of particles."""
    def rss_file_bytes():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("RssFile:"))

    n, box = 4000, 64  # 65.5 MB of float32 pixels
    path = tmp_path / "big.mrcs"
    with mrcfile.new_mmap(path, shape=(n, box, box), mrc_mode=2) as mrc:
        mrc.data[:] = 1.0
    ds = ParticleDataset(make_table([str(path)] * n, np.arange(n)), normalize=False)
    before = rss_file_bytes()
    total = 0.0
    for batch in ds.batches(500, shuffle=True, generator=torch.Generator().manual_seed(0)):
        total += float(batch.images.sum())
    assert total == n * box * box  # every image was read
    assert rss_file_bytes() - before < 8 * 2 ** 20


def test_types_pose_ctf_and_single_item(particles_dir):
    table = read_star(particles_dir / TRPV1 / "trpv1_small_stack.star",
                      stack_map={"batch_0_restacked.mrc": particles_dir / TRPV1 / "trpv1_small_stack.mrcs"})
    ds = ParticleDataset(table)
    batch = ds[torch.tensor([4, 2])]
    assert batch.ctf.defocus_u.dtype == torch.float32 and batch.pose.rotmat.dtype == torch.float32
    torch.testing.assert_close(batch.pose.rotmat, table.pose.rotmat[[4, 2]].float())
    torch.testing.assert_close(batch.pose.shift_angst, table.pose.shift_angst[[4, 2]].float())
    torch.testing.assert_close(batch.ctf.defocus_angle, table.ctf.defocus_angle[[4, 2]].float())
    torch.testing.assert_close(batch.pixel_size, torch.full((2,), 4.88))
    item = ds[4]
    assert item.images.shape == (48, 48) and item.index.item() == 4 and item.pose.rotmat.shape == (3, 3)
    stacked = collate_particles([ds[4], ds[2]])
    torch.testing.assert_close(stacked.images, batch.images)
    torch.testing.assert_close(stacked.pose.rotmat, batch.pose.rotmat)
    assert ds[-1].index.item() == 9
    assert ds.has_ctf and ds.has_pose and ds.box_size == 48 and ds.image_size == 48
    with pytest.raises(IndexError):
        ds[[10]]


def test_downsample_real_stack(particles_dir):
    table = read_star(particles_dir / R31 / "relion31.v2.star")
    full = ParticleDataset(table, normalize=False)
    small = ParticleDataset(table, downsample=64, normalize=False)
    assert small.box_size == 256 and small.image_size == 64
    assert small.pixel_size == pytest.approx(2.806 * 4) and full.pixel_size == pytest.approx(2.806)
    a, b = full[[1, 3]], small[[1, 3]]
    assert b.images.shape == (2, 64, 64)
    torch.testing.assert_close(b.pixel_size, torch.full((2,), 2.806 * 4))
    torch.testing.assert_close(b.images, fourier_crop(a.images, 64))
    torch.testing.assert_close(b.images.mean(dim=(1, 2)), a.images.mean(dim=(1, 2)), atol=1e-5, rtol=1e-4)


def test_downsample_keeps_a_constant_image_constant(particles_dir, tmp_path):
    """A real stack with one image replaced by a constant: that image stays the constant."""
    raw = np.array(open_mrc(particles_dir / TRPV1 / "trpv1_small_stack.mrcs").data)
    raw[3] = 2.5
    path = stack_file(tmp_path, raw, voxel=4.88)
    ds = ParticleDataset(table_from_stack(path), downsample=16, normalize=False)
    img = ds[[3]].images[0]
    torch.testing.assert_close(img, torch.full((16, 16), 2.5), atol=1e-5, rtol=0)
    assert ds.pixel_size == pytest.approx(4.88 * 3, rel=1e-6)


def test_invert_and_normalize(particles_dir):
    table = read_star(particles_dir / "sim_aspire_spike_L64_ctf_clean/particles.star")
    plain = ParticleDataset(table, normalize=False)
    inverted = ParticleDataset(table, normalize=False, invert_contrast=True)
    torch.testing.assert_close(inverted[[0, 5]].images, -plain[[0, 5]].images)
    norm = ParticleDataset(table, normalize=True, invert_contrast=True)
    x = plain[:].images.double().neg()
    assert norm.norm_mean == pytest.approx(x.mean().item(), rel=1e-6)  # n = 100 < 1000: all sampled
    assert norm.norm_std == pytest.approx(x.std(unbiased=False).item(), rel=1e-6)
    y = norm[:].images.double()
    assert abs(y.mean().item()) < 1e-5 and y.std().item() == pytest.approx(1.0, rel=1e-3)
    sampled = ParticleDataset(table, norm_sample=10, seed=3)
    again = ParticleDataset(table, norm_sample=10, seed=3)
    assert (sampled.norm_mean, sampled.norm_std) == (again.norm_mean, again.norm_std)
    assert sampled.norm_std != pytest.approx(norm.norm_std, rel=1e-9)


def test_batches_iterator(particles_dir):
    ds = ParticleDataset(read_particles(particles_dir / "sim_aspire_spike_L64_noctf_clean/particles.star"))
    it = ds.batches(6)
    assert len(it) == 4
    seen = torch.cat([b.index for b in it])
    assert seen.tolist() == list(range(20))
    shuffled = [b.index for b in ds.batches(6, shuffle=True, generator=7)]
    again = [b.index for b in ds.batches(6, shuffle=True, generator=7)]
    assert all(torch.equal(p, q) for p, q in zip(shuffled, again, strict=True))
    assert sorted(torch.cat(shuffled).tolist()) == list(range(20))
    assert torch.cat(shuffled).tolist() != list(range(20))
    assert len(ds.batches(6, drop_last=True)) == 3
    sub = ds.batches(4, indices=[1, 3, 5])
    assert len(sub) == 1 and next(iter(sub)).index.tolist() == [1, 3, 5]


def test_pickle_and_dataloader_worker(particles_dir):
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    ds = ParticleDataset(read_particles(particles_dir / "cryodrgn_hand/hand.mrcs"))
    expected = ds[[0, 1, 2, 3]].images
    clone = pickle.loads(pickle.dumps(ds))
    torch.testing.assert_close(clone[[0, 1, 2, 3]].images, expected)
    loader = DataLoader(ds, batch_size=None, num_workers=1,
                        sampler=BatchSampler(SequentialSampler(range(8)), 4, drop_last=False))
    batches = list(loader)
    assert len(batches) == 2
    torch.testing.assert_close(batches[0].images, expected)


# --------------------------------------------------------------------------------------------
# Bad input, one test each: the message names the file
# --------------------------------------------------------------------------------------------

def test_missing_stack(particles_dir):
    star = particles_dir / TRPV1 / "trpv1_small_stack.star"
    with pytest.raises(CryoaceInputError, match="not found") as err:
        ParticleDataset(read_star(star))
    one_line_naming(err, particles_dir / TRPV1 / "batch_0_restacked.mrc", star)


def test_index_out_of_range(particles_dir):
    stack = particles_dir / R31 / "relion31.mrcs"
    with pytest.raises(CryoaceInputError, match="holds 5 images") as err:
        ParticleDataset(make_table([str(stack)] * 2, [4, 5]))
    one_line_naming(err, stack)


def test_truncated_stack(particles_dir, tmp_path):
    path = tmp_path / "cut.mrcs"
    shutil.copy(particles_dir / R31 / "relion31.mrcs", path)
    path.chmod(0o644)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    with pytest.raises(CryoaceInputError, match="truncated") as err:
        ParticleDataset(make_table([str(path)], [0]))
    one_line_naming(err, path)


@pytest.mark.parametrize("shape,pattern", [((2, 32, 34), "not square"), ((2, 33, 33), "odd")])
def test_bad_box(tmp_path, shape, pattern):
    path = stack_file(tmp_path, np.zeros(shape))
    with pytest.raises(CryoaceInputError, match=pattern) as err:
        ParticleDataset(make_table([str(path)], [0]))
    one_line_naming(err, path)


def test_box_mismatches(particles_dir, tmp_path):
    a = particles_dir / TRPV1 / "trpv1_small_stack.mrcs"
    b = stack_file(tmp_path, np.zeros((2, 64, 64)))
    with pytest.raises(CryoaceInputError, match="box") as err:
        ParticleDataset(make_table([str(a), str(b)], [0, 0]))
    one_line_naming(err, b)
    with pytest.raises(CryoaceInputError, match="image size 64") as err:
        ParticleDataset(make_table([str(a)], [0], image_size=np.array([64])))
    one_line_naming(err, a)
    for bad in (47, 50, 0):
        with pytest.raises(CryoaceInputError, match="downsample"):
            ParticleDataset(make_table([str(a)], [0]), downsample=bad)


@pytest.mark.filterwarnings("ignore:Data array contains", "ignore::RuntimeWarning")
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_inf_pixels(tmp_path, value):
    data = np.ones((6, 16, 16), np.float32)
    data[4, 3, 3] = value
    path = stack_file(tmp_path, data)
    ds = ParticleDataset(make_table([str(path)] * 6, range(6)), normalize=False)
    ds[[0, 1, 2]]  # clean images read fine
    with pytest.raises(CryoaceInputError, match="NaN or Inf") as err:
        ds[[1, 4]]
    msg = one_line_naming(err, path)
    assert "particle 5 (image 5 of " in msg  # both counted from 1


def test_zero_or_absent_pixel_size(particles_dir, tmp_path):
    with pytest.raises(CryoaceInputError, match="no pixel size") as err:
        ParticleDataset(read_star(particles_dir / "relion_project_aspire/rln_proj_64.star"))
    one_line_naming(err, particles_dir / "relion_project_aspire/rln_proj_64.star")
    with pytest.raises(CryoaceInputError, match="pixel size") as err:
        make_table([str(particles_dir / R31 / "relion31.mrcs")], [0], pixel_size=0.0, source=tmp_path / "t.star")
    one_line_naming(err, tmp_path / "t.star")
    path = stack_file(tmp_path, np.zeros((2, 8, 8)), voxel=0.0)
    with pytest.raises(CryoaceInputError, match="pixel size") as err:
        read_particles(path)
    one_line_naming(err, path)


def test_missing_required_column(particles_dir):
    table = read_star(particles_dir / "relion31_cryodrgn/relion31.v2.star")
    table.image_paths = table.image_indices = None
    with pytest.raises(CryoaceInputError, match="rlnImageName") as err:
        ParticleDataset(table)
    one_line_naming(err, particles_dir / "relion31_cryodrgn/relion31.v2.star")
