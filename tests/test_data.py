"""CIFAR-10 loading (binary and python versions, md5 and truncation errors), splits, the seed's
transforms, and the batched augmentation against torchvision's PIL pipeline.

Tests on the real data use CIFAR10_ROOT (CI: ../shared/data) and skip without it; the rest use
synthetic images.
"""
import math
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

import data
from utils import UserError

# ImageNet statistics, as the seed's Normalize (independent of data.MEAN / data.STD)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
BIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
RECORD = 3073


# ----------------------------------------------------------------------------------------------
# The real binary version


def test_cifar10_binary_contents(cifar):
    train_x, train_y, test_x, test_y = cifar
    assert train_x.shape == (50_000, 32, 32, 3) and test_x.shape == (10_000, 32, 32, 3)
    assert train_x.dtype == np.uint8 and test_x.dtype == np.uint8
    assert train_y.shape == (50_000,) and test_y.shape == (10_000,)
    assert np.array_equal(np.bincount(train_y), [5000] * 10)
    assert np.array_equal(np.bincount(test_y), [1000] * 10)
    assert data.CLASSES[3] == "cat" and test_y[0] == 3  # the first test image is a cat
    # the well-known first labels of data_batch_1 and test_batch
    assert train_y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert test_y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    # the well-known per-channel means of the training set: channels are R, G, B in that order
    mean = train_x.reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(mean, [0.4914, 0.4822, 0.4465], atol=2e-4)


def _official_batch(records, name):
    """One batch of the python version, as the official (Python 2) files hold it."""
    return {b"batch_label": name.encode(), b"labels": records[:, 0].astype(int).tolist(),
            b"data": np.ascontiguousarray(records[:, 1:]),
            b"filenames": [f"img_{i}.png".encode() for i in range(len(records))]}


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 str (BINSTRING), as the official cifar-10-python files were written:
    pickle.load(..., encoding='bytes') gives b'data' keys, encoding='latin1' (torchvision) 'data'."""
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump_py2(obj, path):
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


@pytest.fixture(scope="module")
def py_version(cifar_root, tmp_path_factory):
    """A small cifar-10-batches-py folder written from the raw bytes of the .bin files (not through
    data.py): the first 40 records of each training batch and the first 100 test records.
    -> (root, train indices, test indices) into the full binary arrays."""
    root = tmp_path_factory.mktemp("py")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    take = {name: (100 if name == "test_batch.bin" else 40) for name in BIN_FILES}
    for name in BIN_FILES:
        with open(os.path.join(cifar_root, "cifar-10-batches-bin", name), "rb") as f:
            raw = f.read(take[name] * RECORD)
        records = np.frombuffer(raw, np.uint8).reshape(-1, RECORD)  # label, 1024 R, 1024 G, 1024 B
        _dump_py2(_official_batch(records, name), folder / name[:-len(".bin")])
    _dump_py2({b"label_names": [c.encode() for c in data.CLASSES], b"num_cases_per_batch": 10000,
               b"num_vis": 3072}, folder / "batches.meta")
    train_idx = np.concatenate([np.arange(40) + 10_000 * i for i in range(5)])
    return root, train_idx, np.arange(100)


def test_python_version_reads_the_same_images(py_version, cifar, monkeypatch):
    root, train_idx, test_idx = py_version
    with open(root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:  # the official format
        batch = pickle.load(f, encoding="bytes")
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (40, 3072)
    # the files are not the official ones, so torchvision's md5 check is patched out (here only)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity",
                        lambda fpath, md5=None: os.path.isfile(fpath))
    train_x, train_y, test_x, test_y = data.load_cifar10(str(root), download=False)
    assert train_x.dtype == np.uint8 and train_x.shape == (200, 32, 32, 3) and test_x.shape == (100, 32, 32, 3)
    assert train_y.dtype == np.int64 and test_y.dtype == np.int64
    assert np.array_equal(train_x, cifar[0][train_idx]) and np.array_equal(train_y, cifar[1][train_idx])
    assert np.array_equal(test_x, cifar[2][test_idx]) and np.array_equal(test_y, cifar[3][test_idx])
    assert test_y[0] == 3


def test_python_version_with_wrong_md5_is_a_user_error(py_version):
    root = py_version[0]  # torchvision's own md5 check, not patched: these files are not official
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        data.load_cifar10(str(root), download=False)


def _bin_root(tmp_path, cifar_root, replace):
    """tmp_path/cifar-10-batches-bin with links to the real files, ``replace`` {name: bytes} copied."""
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for name in BIN_FILES:
        src = os.path.join(cifar_root, "cifar-10-batches-bin", name)
        if name in replace:
            (folder / name).write_bytes(replace[name])
        else:
            os.symlink(src, folder / name)
    return str(tmp_path)


def _raw(cifar_root, name):
    with open(os.path.join(cifar_root, "cifar-10-batches-bin", name), "rb") as f:
        return bytearray(f.read())


def test_wrong_md5_names_the_file(tmp_path, cifar_root):
    raw = _raw(cifar_root, "data_batch_2.bin")
    raw[RECORD * 17 + 500] ^= 0x01  # one pixel bit of image 17: same size, another md5
    root = _bin_root(tmp_path, cifar_root, {"data_batch_2.bin": bytes(raw)})
    with pytest.raises(UserError, match="md5") as e:
        data.load_cifar10(root, download=False)
    assert os.path.join(root, "cifar-10-batches-bin", "data_batch_2.bin") in str(e.value)


@pytest.mark.parametrize("cut", [100, RECORD * 10])  # mid-record, and whole records missing
def test_truncated_file_names_the_file(tmp_path, cifar_root, cut):
    raw = _raw(cifar_root, "test_batch.bin")
    root = _bin_root(tmp_path, cifar_root, {"test_batch.bin": bytes(raw[:-cut])})
    with pytest.raises(UserError) as e:
        data.load_cifar10(root, download=False)
    assert "test_batch.bin" in str(e.value)
    assert ("truncated" in str(e.value)) or ("md5" in str(e.value))


def test_missing_file_names_the_file(tmp_path, cifar_root, monkeypatch):
    monkeypatch.delenv("CIFAR10_PARTIAL", raising=False)  # the opt-in to a partial folder
    root = _bin_root(tmp_path, cifar_root, {})
    os.remove(os.path.join(root, "cifar-10-batches-bin", "data_batch_4.bin"))
    with pytest.raises(UserError, match="data_batch_4.bin"):
        data.load_cifar10(root, download=False)


def test_no_data_and_no_download(tmp_path):
    with pytest.raises(UserError) as e:
        data.load_cifar10(str(tmp_path), download=False)
    msg = str(e.value)
    assert os.path.join(str(tmp_path), "cifar-10-batches-bin") in msg
    assert os.path.join(str(tmp_path), "cifar-10-batches-py") in msg
    assert "\n" not in msg


# ----------------------------------------------------------------------------------------------
# Splits and subsets (synthetic, unbalanced labels: a balanced split is then not an accident)


def _labels():
    rng = np.random.default_rng(0)
    return rng.permutation(np.repeat(np.arange(10), np.arange(10) * 20 + 300))


def test_split_train_val():
    labels = _labels()
    train, val = data.split_train_val(labels, 500, seed=1)
    assert len(val) == 500 and len(np.unique(val)) == 500
    assert np.array_equal(np.bincount(labels[val], minlength=10), [50] * 10)
    assert len(np.intersect1d(train, val)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    train2, val2 = data.split_train_val(labels, 500, seed=1)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    _, val3 = data.split_train_val(labels, 500, seed=2)
    assert not np.array_equal(val, val3)
    assert len(np.intersect1d(val, val3)) < 250  # a fresh draw, not a shifted one
    with pytest.raises(UserError):
        data.split_train_val(labels, 505, seed=1)  # not class-balanced
    with pytest.raises(UserError):
        data.split_train_val(labels, 3000, seed=1)  # 300 a class would leave class 0 empty


def test_subset():
    idx = np.arange(1000, 3000, 2)
    a = data.subset(idx, 100, seed=0)
    assert len(a) == 100 and len(np.unique(a)) == 100 and np.isin(a, idx).all()
    assert np.array_equal(a, data.subset(idx, 100, seed=0))
    assert not np.array_equal(a, data.subset(idx, 100, seed=1))
    assert np.array_equal(data.subset(idx, None, seed=0), idx)
    assert len(data.subset(idx, len(idx), seed=0)) == len(idx)
    with pytest.raises(UserError):
        data.subset(idx, len(idx) + 1, seed=0)


# ----------------------------------------------------------------------------------------------
# The seed's transforms


def _images(n, seed=0, side=32):
    """Random uint8 (n, side, side, 3): high-frequency content shows any resampling misalignment."""
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


@pytest.mark.parametrize("size", [224, 64, 32])
def test_seed_train_transform_matches_torchvision(size):
    reference = T.Compose([T.Resize(size), T.RandomHorizontalFlip(0.5),
                           T.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(1.0, 1.0)),
                           T.ToTensor(), T.Normalize(MEAN, STD)])
    transform = data.seed_train_transform(size)
    for seed, image in enumerate(_images(4)):
        img = Image.fromarray(image)
        torch.manual_seed(seed)
        out = transform(img)
        torch.manual_seed(seed)
        assert torch.equal(out, reference(img))
        assert out.shape == (3, size, size)
    img = Image.fromarray(_images(1)[0])
    draws = []
    for seed in range(6):
        torch.manual_seed(seed)
        draws.append(transform(img))
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # it is random


@pytest.mark.parametrize("size", [224, 64, 32])
def test_eval_transform_matches_torchvision(size):
    reference = T.Compose([T.Resize(size), T.ToTensor(), T.Normalize(MEAN, STD)])
    img = Image.fromarray(_images(1)[0])
    assert torch.equal(data.eval_transform(size)(img), reference(img))


# ----------------------------------------------------------------------------------------------
# The batched augmentation against torchvision's PIL pipeline


def _pil_reference(image, size, top, left, side, flip):
    """The seed's Resize -> flip -> RandomResizedCrop (fixed box) -> ToTensor -> Normalize."""
    img = TF.resize(Image.fromarray(image), size)
    if flip:
        img = TF.hflip(img)
    img = TF.resized_crop(img, top, left, side, side, [size, size])
    return TF.normalize(TF.to_tensor(img), MEAN, STD)


def _pixel_diff(a, b):
    """|a - b| of normalised batches in [0, 1] pixel units (undoing the division by std)."""
    return (a - b).abs() * torch.tensor(STD).view(1, 3, 1, 1)


def _bound(size, resizes):
    """PIL resamples each axis in its own pass and rounds to uint8 after each: at most 0.5/255 per
    pass, not amplified by the (non-negative, sum-to-one) interpolation weights; Resize(32) of a
    32x32 image does nothing. Plus float32 slack."""
    passes = 2 * resizes - (2 if size == 32 else 0)
    return (0.5 * passes + 0.01) / 255


@pytest.mark.parametrize("size,n", [(224, 6), (64, 24), (32, 24)])
def test_batched_augmentation_matches_pil(size, n):
    """Measured max |diff| (pixel units): 1.72/255 at 224, 1.97/255 at 64, 1.00/255 at 32;
    mean about 0.35, 0.41, 0.29 /255."""
    images = _images(n, seed=size)
    boxes, (top, left, side, flip) = _edge_and_drawn_boxes(n, size, seed=size)
    resize = data.resize_matrix(32, size).to(torch.float32)
    rows, cols = data.augment_matrices(resize, top, left, side, flip)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    out = data.resample(torch.from_numpy(images), rows, cols, mean, std)
    ref = torch.stack([_pil_reference(im, size, *b) for im, b in zip(images, boxes)])
    assert out.shape == ref.shape == (n, 3, size, size) and out.dtype == torch.float32
    diff = _pixel_diff(out, ref)
    print(f"size {size}: max {diff.max().item() * 255:.3f}/255, mean {diff.mean().item() * 255:.3f}/255")
    assert diff.max() <= _bound(size, 2)
    assert diff.mean() < 0.5 / 255
    # a wrong flip or box is far outside the tolerance, so the check above means something
    wrong_rows, wrong_cols = data.augment_matrices(resize, top, left, side, ~flip)
    wrong = data.resample(torch.from_numpy(images), wrong_rows, wrong_cols, mean, std)
    assert _pixel_diff(wrong, ref).amax(dim=(1, 2, 3)).min() > 10 / 255


def _edge_and_drawn_boxes(n, size, seed):
    """n crop boxes (top, left, side, flip): the whole image and the smallest crops at three
    corners, flipped and not, then torchvision's own draws of the seed's crop."""
    g = torch.Generator().manual_seed(seed)
    smallest = round(size * math.sqrt(0.8))
    edge = [(0, 0, size), (0, 0, smallest), (size - smallest, size - smallest, smallest),
            (0, size - smallest, smallest)]
    boxes = []
    for i in range(n):
        if i < len(edge):
            top, left, side = edge[i]
        else:
            torch.manual_seed(1000 * size + i)
            top, left, h, side = T.RandomResizedCrop.get_params(torch.empty(3, size, size), (0.8, 1.0), (1.0, 1.0))
            assert h == side
        boxes.append((top, left, side, bool(torch.rand(1, generator=g) < 0.5) if i >= 2 else i == 1))
    crops = [torch.tensor([b[k] for b in boxes]) for k in range(4)]
    assert crops[3].any() and (~crops[3]).any()
    return boxes, crops


@pytest.mark.parametrize("side,size", [(224, 224), (96, 80), (72, 96)])
def test_kernel_path_matches_pil(side, size):
    """Images stored above KERNEL_SIDE px (an image folder's cache) take torch's uint8 kernels on
    the CPU: the seed's PIL pipeline within a rounding step per resize, the same size (the cache
    holds Resize(S) already), shrunk or enlarged first. Measured max |diff| 1/255 (torch's uint8
    kernels round as PIL does), mean 0.010, 0.002 and 0 /255."""
    assert data.uses_kernels(side, "cpu") and not data.uses_kernels(32, "cpu") and not data.uses_kernels(side, "meta")
    images = _images(6, seed=side, side=side)
    boxes, crops = _edge_and_drawn_boxes(len(images), size, seed=side)
    loader = data.TensorLoader(images, np.zeros(len(images)), len(images), size, train=True, device="cpu",
                               channels_last=True)
    assert loader.kernels
    out = loader.batch(torch.arange(len(images)), crops)
    ref = torch.stack([_pil_reference(im, size, *b) for im, b in zip(images, boxes)])
    assert out.shape == ref.shape == (len(images), 3, size, size) and out.is_contiguous(memory_format=torch.channels_last)
    diff = _pixel_diff(out, ref)
    print(f"{side} -> {size}: max {diff.max().item() * 255:.3f}/255, mean {diff.mean().item() * 255:.3f}/255")
    assert diff.max() <= 1.01 / 255 and diff.mean() < 0.05 / 255
    # the matmuls give the same batch within the kernels' rounding
    matmul = data.TensorLoader(images, np.zeros(len(images)), len(images), size, train=True, device="cpu",
                               kernels=False).batch(torch.arange(len(images)), crops)
    assert _pixel_diff(out, matmul).max() <= 2.01 / 255
    # a wrong flip is far outside the tolerance
    top, left, sides, flip = crops
    assert _pixel_diff(loader.batch(torch.arange(len(images)), (top, left, sides, ~flip)), ref).amax(
        dim=(1, 2, 3)).min() > 10 / 255
    # and so is a box off by one pixel
    shifted = _pixel_diff(loader.batch(torch.arange(len(images)), (top.clamp(min=1) - 1, left, sides, flip)), ref)
    assert shifted.amax(dim=(1, 2, 3))[top > 0].min() > 10 / 255
    # evaluation: Resize(S) alone, as the eval transform
    evaluated = data.TensorLoader(images, np.zeros(len(images)), len(images), size, train=False,
                                  device="cpu").batch(torch.arange(len(images)))
    ref = torch.stack([data.eval_transform(size)(Image.fromarray(im)) for im in images])
    assert _pixel_diff(evaluated, ref).max() <= 1.01 / 255


@pytest.mark.parametrize("size", [224, 64, 32])
def test_batched_eval_matches_eval_transform(size):
    images = _images(8, seed=size + 1)
    resize = data.resize_matrix(32, size).to(torch.float32)
    rows = resize.expand(len(images), -1, -1)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    out = data.resample(torch.from_numpy(images), rows, rows, mean, std)
    ref = torch.stack([data.eval_transform(size)(Image.fromarray(im)) for im in images])
    diff = _pixel_diff(out, ref)
    print(f"eval size {size}: max {diff.max().item() * 255:.3f}/255, mean {diff.mean().item() * 255:.3f}/255")
    assert diff.max() <= _bound(size, 1)
    assert diff.mean() < 0.5 / 255


# ----------------------------------------------------------------------------------------------
# The crop and flip distribution


def _side_pmf(size):
    """Exact distribution of torchvision's side = round(sqrt(size^2 * U(0.8, 1)))."""
    k = np.arange(1, size + 1)
    lo = np.clip(((k - 0.5) / size) ** 2, 0.8, 1.0)
    hi = np.clip(((k + 0.5) / size) ** 2, 0.8, 1.0)
    return k, (hi - lo) / 0.2


@pytest.mark.parametrize("size", [224, 64, 32])
def test_draw_crops_distribution(size):
    n = 200_000
    g = torch.Generator().manual_seed(size)
    top, left, side, flip = (t.cpu() for t in data.draw_crops(n, size, g, "cpu"))
    assert top.shape == left.shape == side.shape == flip.shape == (n,)
    top, left, side = top.numpy().astype(np.int64), left.numpy().astype(np.int64), side.numpy().astype(np.int64)
    flip = flip.numpy().astype(bool)

    # side: the exact distribution, bin by bin (5 sigma binomial)
    k, p = _side_pmf(size)
    counts = np.bincount(side, minlength=size + 1)[1:]
    assert counts.sum() == n  # no side outside 1..size
    sigma = np.sqrt(n * p * (1 - p))
    bad = np.abs(counts - n * p) > 5 * sigma + (p > 0)  # a side of probability 0 never occurs
    assert not bad.any(), k[bad]
    area = side ** 2 / size ** 2
    assert area.min() >= (round(size * math.sqrt(0.8)) / size) ** 2 and area.max() <= 1.0

    # positions: inside the image, uniform over the valid offsets 0..size-side
    for pos in (top, left):
        assert pos.min() >= 0 and (pos <= size - side).all()
        span = size - side  # offsets 0..span, equally likely
        mean, var = span / 2, ((span + 1) ** 2 - 1) / 12
        z = (pos - mean).sum() / np.sqrt(var.sum())
        assert abs(z) < 5, z
        assert abs(((pos - mean) ** 2).sum() / var.sum() - 1) < 0.02
        for s in np.unique(side):  # both extremes are reached
            if s < size and (side == s).sum() > 2000:
                sel = pos[side == s]
                assert sel.min() == 0 and sel.max() == size - s
    centred = [(pos - (size - side) / 2) for pos in (top, left)]
    assert abs(np.corrcoef(*centred)[0, 1]) < 5 / np.sqrt(n)  # top and left drawn independently

    # flip: rate 1/2, independent of the crop
    assert abs(flip.mean() - 0.5) < 5 * np.sqrt(0.25 / n)
    assert abs(np.corrcoef(flip, side)[0, 1]) < 5 / np.sqrt(n)


def test_draw_crops_against_torchvision_get_params():
    size, n_tv = 224, 20_000
    torch.manual_seed(0)
    img = torch.empty(3, size, size)
    tv = np.array([T.RandomResizedCrop.get_params(img, (0.8, 1.0), (1.0, 1.0)) for _ in range(n_tv)])
    assert (tv[:, 2] == tv[:, 3]).all()  # torchvision's crops are square too
    tv_area = tv[:, 2] ** 2 / size ** 2
    top, left, side, _ = data.draw_crops(200_000, size, torch.Generator().manual_seed(1), "cpu")
    area = side.numpy() ** 2 / size ** 2
    assert abs(area.mean() - tv_area.mean()) < 5 * np.sqrt(tv_area.var() / n_tv + area.var() / len(area))
    assert abs(area.mean() - 0.9) < 0.002
    grid = np.unique(np.concatenate([area, tv_area]))
    ks = np.abs(np.searchsorted(np.sort(area), grid, "right") / len(area)
                - np.searchsorted(np.sort(tv_area), grid, "right") / n_tv).max()
    assert ks < 0.02, ks  # two-sample Kolmogorov-Smirnov distance, about 1e-4 significance
    for q in (0.1, 0.5, 0.9):  # quantiles agree to within one side step
        assert abs(np.quantile(side.numpy(), q) - np.quantile(tv[:, 2], q)) <= 1
    # positions relative to the free span, as torchvision's randint(0, span + 1)
    for ours, theirs in ((top.numpy(), tv[:, 0]), (left.numpy(), tv[:, 1])):
        rel = (ours + 0.5) / (size - side.numpy() + 1)
        rel_tv = (theirs + 0.5) / (size - tv[:, 2] + 1)
        assert abs(rel.mean() - rel_tv.mean()) < 0.01


# ----------------------------------------------------------------------------------------------
# TensorLoader


def _loader(n=50, batch=8, size=32, train=True, seed=0, **kw):
    images = _images(n, seed=7)
    ids = np.arange(n, dtype=np.int64)  # labels double as image ids
    return data.TensorLoader(images, ids, batch, size, train, "cpu", seed=seed, **kw), images


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]  # the CPU loader reuses its output buffer


def test_tensor_loader_train_shapes_and_drop_last():
    loader, _ = _loader()
    batches = _batches(loader)
    assert len(loader) == len(batches) == 50 // 8
    for x, y in batches:
        assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
        assert y.shape == (8,) and y.dtype == torch.int64
    ids = torch.cat([y for _, y in batches])
    assert len(ids.unique()) == len(ids) == 48  # no image twice in an epoch
    assert not torch.equal(ids, torch.arange(48))  # shuffled


def test_tensor_loader_eval_covers_every_image_once():
    loader, images = _loader(size=40, train=False)
    batches = _batches(loader)
    assert len(loader) == len(batches) == 7 and len(batches[-1][1]) == 50 - 6 * 8
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(50))
    x = torch.cat([x for x, _ in batches])
    ref = torch.stack([data.eval_transform(40)(Image.fromarray(im)) for im in images])
    assert _pixel_diff(x, ref).max() <= _bound(40, 1)
    loader_b, _ = _loader(size=40, train=False)  # evaluation is not random
    loader_b.set_epoch(5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, _batches(loader_b)))


def test_tensor_loader_augments_each_image_independently():
    images = np.repeat(_images(1), 16, axis=0)
    loader = data.TensorLoader(images, np.zeros(16, dtype=np.int64), 16, 64, True, "cpu")
    x, _ = next(iter(loader))
    distinct = {tuple(x[i, 0, ::8, ::8].flatten().tolist()) for i in range(16)}
    assert len(distinct) > 4  # one crop and flip per image, not one per batch
    no_aug = data.TensorLoader(images, np.zeros(16, dtype=np.int64), 16, 64, True, "cpu", augment=False)
    x, _ = next(iter(no_aug))
    assert (x - x[:1]).abs().max() < 1e-5


def test_tensor_loader_is_a_function_of_seed_and_epoch():
    a, _ = _loader(seed=3)
    b, _ = _loader(seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    first, second = _batches(a), _batches(b)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, second))
    b.set_epoch(3)
    other = _batches(b)
    assert not torch.equal(first[0][1], other[0][1])
    c, _ = _loader(seed=4)
    c.set_epoch(2)
    assert not torch.equal(first[0][1], _batches(c)[0][1])
    # each image gets a fresh crop and flip every epoch
    by_id = [{int(i): img for x, y in batches for img, i in zip(x, y)} for batches in (first, other)]
    common = set(by_id[0]) & set(by_id[1])
    assert len(common) > 40
    same = sum(torch.equal(by_id[0][i], by_id[1][i]) for i in common)
    assert same < len(common) / 2


def test_tensor_loader_resumes_mid_epoch():
    full, _ = _loader(seed=5)
    full.set_epoch(1)
    expected = _batches(full)
    resumed, _ = _loader(seed=5)
    resumed.set_epoch(1, start_step=4)
    got = _batches(resumed)
    assert len(got) == len(expected) - 4
    for (x1, y1), (x2, y2) in zip(got, expected[4:]):
        assert torch.equal(y1, y2) and torch.equal(x1, x2)
    again = _batches(resumed)  # the next pass over the loader is a whole epoch again
    assert len(again) == len(expected)


@pytest.mark.parametrize("train", [True, False])
def test_tensor_loader_ddp_slices_make_the_global_batch(train):
    world, _ = _loader(batch=8, train=train, seed=6)
    ranks = [_loader(batch=8, train=train, seed=6, rank=r, world_size=2)[0] for r in (0, 1)]
    for loader in (world, *ranks):
        loader.set_epoch(1)
    global_batches = _batches(world)
    per_rank = [_batches(r) for r in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(global_batches)
    for (gx, gy), (x0, y0), (x1, y1) in zip(global_batches, *per_rank):
        assert len(y0) + len(y1) == len(gy)
        assert abs(len(y0) - len(y1)) <= 1
        assert len(np.intersect1d(y0.numpy(), y1.numpy())) == 0
        assert sorted(torch.cat([y0, y1]).tolist()) == sorted(gy.tolist())
        for x, y in ((x0, y0), (x1, y1)):
            for img, i in zip(x, y):
                torch.testing.assert_close(img, gx[(gy == i).nonzero()[0, 0]], rtol=0, atol=1e-5)


def test_get_loaders_splits(cifar_root):
    loaders = data.get_loaders(cifar_root, batch_size=100, image_size=32, train_subset=300,
                               test_subset=200, val_split=1000, seed=0, download=False)
    assert len(loaders["train"]) == 3 and len(loaders["test"]) == 2 and len(loaders["val"]) == 10
    x, y = next(iter(loaders["val"]))
    assert x.shape == (100, 3, 32, 32) and y.shape == (100,)
    assert len(loaders["val"].labels) == 1000
    assert np.array_equal(np.bincount(loaders["val"].labels.numpy(), minlength=10), [100] * 10)


def test_split_seed_keeps_the_split_and_changes_the_rest(cifar_root):
    """Issue 32: --seed 1 --split-seed 0 holds out seed 0's validation images and tests on seed 0's
    test subset (the same images, so runs of both seeds pair up image by image), while the
    batches it trains on are drawn from seed 1."""
    kw = dict(batch_size=100, image_size=32, train_subset=300, test_subset=200, val_split=1000, download=False)
    seed0 = data.get_loaders(cifar_root, seed=0, **kw)
    seed1 = data.get_loaders(cifar_root, seed=1, split_seed=0, **kw)
    own1 = data.get_loaders(cifar_root, seed=1, **kw)
    for split in ("train", "val", "test"):
        assert torch.equal(seed0[split].images, seed1[split].images), split
    assert not torch.equal(own1["val"].images, seed0["val"].images)
    assert not torch.equal(next(iter(seed0["train"]))[1], next(iter(seed1["train"]))[1])  # other batches
    _, _, _, test_y = data.load_cifar10(cifar_root, download=False)
    assert np.array_equal(seed1["test"].labels.numpy(), test_y[data.test_indices(200, 0)])
    assert data.split_seed({"seed": 1, "split_seed": 0}) == 0 and data.split_seed({"seed": 1}) == 1
    assert data.split_seed({"seed": 3, "split_seed": None}) == 3


def test_evaluate_tests_a_run_on_its_split_seeds_images(cifar_root):
    """evaluate.py re-draws a checkpoint's test subset with the run's split seed."""
    import argparse
    import evaluate
    args = argparse.Namespace(data_dir=cifar_root, batch_size=64, test_subset=None, no_download=True)
    info = {"image_size": 32, "args": {"seed": 5, "split_seed": 0, "val_split": 5000, "test_subset": 100}}
    labels = evaluate.test_loader(args, info, "cpu", data.open_dataset(cifar_root, download=False)).labels.numpy()
    _, _, _, test_y = data.load_cifar10(cifar_root, download=False)
    assert np.array_equal(labels, test_y[data.test_indices(100, 0)])
    assert not np.array_equal(labels, test_y[data.test_indices(100, 5)])


def test_a_checkpoint_with_a_bad_split_seed_is_refused():
    import checkpoints
    args = {"model": "resnet", "optimizer": "adamw", "lr": 0.001, "weight_decay": 0.0001, "val_split": 5000,
            "seed": 1, "image_size": 32}
    assert checkpoints.args_problem(dict(args, split_seed=0), "resnet", 32) is None
    assert checkpoints.args_problem(dict(args, split_seed=None), "resnet", 32) is None
    for bad in (-1, 2**64, 1.5, "0", True):
        assert "--split-seed" in checkpoints.args_problem(dict(args, split_seed=bad), "resnet", 32), bad
