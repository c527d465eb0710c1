"""The data: CIFAR-10 or a folder of your own images, splits, the seed's PIL transforms and a
batched on-device augmentation.

Everything starts from uint8 images (N, B, B, 3) and int64 labels: CIFAR-10's arrays (B = 32),
loaded once, or an image folder's memory-mapped cache (folders.py; B is its base size).
``open_dataset`` chooses the source from --data-dir. Two interchangeable data paths produce the
same kind of normalised batches from either:

* ``pil``     -- the seed's pipeline: torchvision PIL transforms in a DataLoader, one image at a time.
* ``tensor``  -- the images stay on the training device as one uint8 tensor; each batch is flipped,
                 random-resized-cropped (one independent draw per image), resized and normalised
                 there with two small batched matmuls (see ``resample``), or, for images stored
                 above 64 px on the CPU, torch's uint8 resize kernels (``resample_kernels``).
"""
import hashlib
import os
import sys
import urllib.error
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

import folders
from utils import UserError, first_line

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics: the pretrained backbones expect them
STD = (0.229, 0.224, 0.225)
TEST_IMAGES = 10000  # CIFAR-10's test set
DATASET = "cifar10"  # names the test set in the predictions files (report.save_predictions)
CIFAR_VAL_SPLIT = 5000  # --val-split's default for CIFAR-10; an image folder without val/ holds out:
FOLDER_VAL_FRACTION = 0.1  # the same tenth of each class (at least one image)
CROP_SCALE = (0.8, 1.0)  # the seed's RandomResizedCrop(scale=(0.8, 1.0), ratio=(1, 1))

# Official md5 of the CIFAR-10 binary version (the same values cifar-10-binary.tar.gz unpacks to).
BIN_MD5 = {
    "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
    "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
    "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
    "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
    "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
    "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
}
BIN_RECORD = 1 + 3 * 32 * 32  # label byte, then 1,024 R, 1,024 G, 1,024 B bytes


# ----------------------------------------------------------------------------------------------
# Loading


def _md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_bin_file(path, check_md5=True):
    """One file of the binary version -> (images uint8 (N, 32, 32, 3), labels int64 (N,))."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        if size == 0 or size % BIN_RECORD:
            raise UserError(f"{path} is truncated or not a CIFAR-10 binary file ({size} bytes, "
                            f"not a multiple of {BIN_RECORD}); download it again")
        if check_md5 and name in BIN_MD5 and _md5(path) != BIN_MD5[name]:
            raise UserError(f"{path} has the wrong md5 (expected {BIN_MD5[name]}); the file is "
                            f"corrupted, download it again")
        records = np.fromfile(path, dtype=np.uint8).reshape(-1, BIN_RECORD)
    except OSError as e:  # unreadable: permissions, a disk error, a folder in its place
        raise UserError(f"cannot read {path} ({e.strerror or e})") from None
    if records[:, 0].max() >= len(CLASSES):  # only without the md5 check: the official files pass
        raise UserError(f"{path} is not a CIFAR-10 binary file (a label byte of {records[:, 0].max()}, "
                        f"not 0-{len(CLASSES) - 1})")
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), records[:, 0].astype(np.int64)


PARTIAL_ENV = "CIFAR10_PARTIAL"  # =1 accepts a folder with only some of the five training batches


def _read_bin(folder):
    names = [f"data_batch_{i}.bin" for i in range(1, 6)]
    missing = [n for n in names + ["test_batch.bin"] if not os.path.isfile(os.path.join(folder, n))]
    partial = os.environ.get(PARTIAL_ENV) == "1" and "test_batch.bin" not in missing and len(missing) < 5
    if missing and not partial:
        raise UserError(f"{folder} lacks {', '.join(missing)}; download CIFAR-10 again (or, to train on "
                        f"the training batches that are there, set {PARTIAL_ENV}=1)")
    if missing:  # a GPU check carries only what fits one call: say so loudly, never silently
        print(f"data: {PARTIAL_ENV}=1: training data is {len(names) - len(missing)} of the 5 batches "
              f"({', '.join(n for n in names if n not in missing)}), not the full 50,000 images",
              file=sys.stderr, flush=True)
    parts = [read_bin_file(os.path.join(folder, n)) for n in names if n not in missing]
    test_x, test_y = read_bin_file(os.path.join(folder, "test_batch.bin"))
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    return train_x, train_y, test_x, test_y


def _read_py(root, download):
    """The python version through torchvision, which checks (and downloads) it with its md5s."""
    import torchvision.datasets as tvd
    try:
        train = tvd.CIFAR10(root, train=True, download=download)
        test = tvd.CIFAR10(root, train=False, download=download)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise UserError(f"could not download CIFAR-10 into {os.path.abspath(root)} ({e}). Offline? "
                        f"Download it on a machine with internet (python or binary version) and pass "
                        f"--data-dir to the folder holding cifar-10-batches-py or cifar-10-batches-bin") from None
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted."
        raise UserError(f"CIFAR-10 python version in {os.path.abspath(root)} is corrupted or incomplete "
                        f"({e}); delete {os.path.join(root, 'cifar-10-batches-py')} and download again") from None
    return (train.data, np.asarray(train.targets, dtype=np.int64),
            test.data, np.asarray(test.targets, dtype=np.int64))


def load_cifar10(root="cifar", download=True):
    """(train_x, train_y, test_x, test_y) as uint8 (N, 32, 32, 3) / int64 arrays.

    Looks in ``root`` for cifar-10-batches-bin, then cifar-10-batches-py; downloads the python
    version with torchvision when neither is there and ``download`` is true.
    """
    bin_dir = os.path.join(root, "cifar-10-batches-bin")
    py_dir = os.path.join(root, "cifar-10-batches-py")
    if os.path.basename(os.path.normpath(root)) == "cifar-10-batches-bin":
        bin_dir = root  # the user pointed at the batches folder itself
    if os.path.isdir(bin_dir):
        return _read_bin(bin_dir)
    if os.path.isdir(py_dir) or download:
        return _read_py(root, download)
    raise UserError(f"CIFAR-10 not found: looked for {os.path.abspath(bin_dir)} and "
                    f"{os.path.abspath(py_dir)}. Drop --no-download to fetch it, or point --data-dir "
                    f"(or CIFAR10_ROOT) at a folder holding either official version")


# ----------------------------------------------------------------------------------------------
# Splits


def split_train_val(labels, val_size, seed):
    """Class-balanced, seeded hold-out: (train_idx, val_idx) into ``labels``. ``val_size``: a
    number of images (a multiple of the classes, the same from each), or a fraction below 1 of
    each class (rounded, at least one image)."""
    classes = np.unique(labels)
    if val_size >= 1 and val_size % len(classes):
        raise UserError(f"--val-split {val_size} must be a multiple of {len(classes)} (class-balanced)", exit_code=2)
    rng = np.random.default_rng(seed)
    val = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        per_class = int(val_size) // len(classes) if val_size >= 1 else max(1, round(val_size * len(idx)))
        if per_class >= len(idx):
            raise UserError(f"--val-split {val_size} leaves no training images of class {c} ({len(idx)} "
                            f"images)", exit_code=2)
        val.append(rng.choice(idx, per_class, replace=False))
    val = np.sort(np.concatenate(val))
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


def subset(idx, n, seed):
    """``n`` of the indices ``idx``, seeded, kept in order; all of them when n is None."""
    if n is None:
        return idx
    if n > len(idx):
        raise UserError(f"subset of {n} images asked for, but only {len(idx)} are available", exit_code=2)
    return np.sort(np.random.default_rng(seed).choice(idx, n, replace=False))


# ----------------------------------------------------------------------------------------------
# The seed's pipeline: torchvision PIL transforms, one image at a time (kept as the reference)


def seed_train_transform(size=224):
    return T.Compose([
        T.Resize(size),
        T.RandomHorizontalFlip(0.5),
        T.RandomResizedCrop(size, scale=CROP_SCALE, ratio=(1, 1)),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def eval_transform(size=224):
    return T.Compose([T.Resize(size), T.ToTensor(), T.Normalize(MEAN, STD)])


class ArrayDataset(Dataset):
    """uint8 (N, 32, 32, 3) images + labels -> (transform(PIL image), label).

    An item is an index, or (index, seed): the transform's random draws then come from torch's RNG
    seeded with ``seed`` (forked: the caller's RNG is left as it was), so they depend on that seed
    alone, not on which worker loads the image nor on what that worker loaded before."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        image = Image.fromarray(self.images[i])
        if seed is None:
            return self.transform(image), int(self.labels[i])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), int(self.labels[i])


# ----------------------------------------------------------------------------------------------
# A user's image files (evaluate.py --images, explain.py --images)


MAX_ASPECT = folders.MAX_ASPECT  # evaluation resizes the shorter side: a 1x100000 strip would become 224 x 22 million


def load_image(path):
    """An image file as an RGB PIL image, or a UserError (one line) for anything PIL cannot read,
    more pixels than PIL reads safely (Image.MAX_IMAGE_PIXELS: a decompression bomb), or a shape
    too elongated to classify once its shorter side is resized to the network's input size."""
    try:
        with warnings.catch_warnings():  # PIL only warns up to twice its limit: refuse those too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if not 0 < max(width, height) <= MAX_ASPECT * min(width, height):
                    raise UserError(f"image {path} is {width}x{height} pixels: too elongated to classify (more "
                                    f"than {MAX_ASPECT}:1); crop it closer to a square")
                return img.convert("RGB")
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"image {path} does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"image {path} has more pixels than PIL reads safely ({e})") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path} is not an image PIL can read ({first_line(e)})") from None
    except Exception as e:
        # PIL's decoders meet a damaged file's bytes with whatever they raise: ValueError,
        # SyntaxError, struct.error, IndexError, ... All mean the same: not an image it can read.
        raise UserError(f"{path} is not an image PIL can read "
                        f"({type(e).__name__}: {first_line(e)})") from None




# ----------------------------------------------------------------------------------------------
# The batched path: Resize -> flip -> crop -> resize -> normalise as two matmuls per image.
#
# Bilinear resampling is linear and separable, so the seed's Resize(S) followed by a crop and a
# resize back to S is, per axis, one (S x 32) matrix: (crop-and-resize rows) @ (Resize matrix).
# An image is then  out = A_rows @ img @ A_cols^T.  Every row of these matrices sums to one, so
# normalising the 32x32 input first is exact, and the flip is a reversed column matrix.


def resize_matrix(n_in, n_out):
    """(n_out, n_in) matrix of torchvision/PIL bilinear resizing (antialiased when shrinking)."""
    eye = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, 1, n_in)
    out = torch.nn.functional.interpolate(eye, size=(1, n_out), mode="bilinear",
                                          antialias=True, align_corners=False)
    return out.view(n_in, n_out).T.contiguous()


def crop_resize_rows(resize, start, length):
    """Per image, the (S, B) matrix that takes rows [start, start+length) of the resized image
    (``resize`` @ img) back up to S rows: 2-tap bilinear, clamped at the crop's edges, exactly as
    PIL upsamples (length <= S always holds for these crops)."""
    size = resize.shape[0]
    o = torch.arange(size, device=start.device, dtype=torch.float32)
    length = length[:, None]
    src = ((o + 0.5) * length / size - 0.5).clamp(min=0)
    src = torch.minimum(src, (length - 1).float())
    lo = src.floor()
    frac = (src - lo)[..., None]
    lo = lo.long()
    hi = torch.minimum(lo + 1, length - 1)
    base = start[:, None]
    # index_select on flat indices: ~3x faster than advanced indexing on the CPU
    below = resize.index_select(0, (base + lo).view(-1)).view(len(start), size, -1)
    above = resize.index_select(0, (base + hi).view(-1)).view(len(start), size, -1)
    return below.lerp_(above, frac)


def draw_crops(n, size, generator, device):
    """The seed's RandomHorizontalFlip(0.5) + RandomResizedCrop(size, (0.8, 1), ratio=(1, 1)) on a
    size x size image, one draw per image: (top, left, side, flip). Square crops always fit, so
    torchvision's first attempt is always taken: side = round(size * sqrt(U(0.8, 1)))."""
    u = torch.rand(4, n, generator=generator, device=device, dtype=torch.float64)
    area = CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u[0]
    side = torch.round(size * area.sqrt()).long().clamp(1, size)
    top = (u[1] * (size - side + 1)).long()
    left = (u[2] * (size - side + 1)).long()
    flip = u[3] < 0.5
    return top, left, side, flip


def augment_matrices(resize, top, left, side, flip):
    """(rows, cols) matrices, each (batch, S, B), for the given crop boxes and flips."""
    rows = crop_resize_rows(resize, top, side)
    cols = crop_resize_rows(resize, left, side)
    # flip-then-crop reads the mirrored resized image; resizing commutes with mirroring, so its
    # matrix is the plain one with the B input columns reversed
    cols = torch.where(flip[:, None, None], cols.flip(-1), cols)
    return rows, cols


def resample(images, rows, cols, mean, std, out=None, tmp=None, channels_last=False):
    """uint8 (N, B, B, 3) -> normalised float32 (N, 3, S, S): rows @ img @ cols^T per channel
    (B: the stored side, 32 for CIFAR-10; rows and cols are (N, S, B)).

    ``channels_last``: the result is computed straight into channels_last memory (B, S, S, 3),
    what train.py feeds the model, instead of NCHW plus a conversion copy.
    ``out`` and ``tmp`` (``resample_buffers``) are filled in place when given: on the CPU, reused
    buffers are much faster than fresh large allocations, whose page faults cost more than the
    arithmetic (150 MB a batch at 224 px)."""
    if channels_last:
        return _resample_nhwc(images, rows, cols, mean, std, out, tmp)
    x = images.permute(0, 3, 1, 2).to(torch.float32).div_(255)
    x = (x - mean) / std  # exact before resampling: interpolation rows sum to one
    x = torch.matmul(x, cols.transpose(1, 2).unsqueeze(1), out=tmp)  # (N, 3, B, S)
    return torch.matmul(rows.unsqueeze(1), x, out=out)  # (N, 3, S, S)


def _resample_nhwc(images, rows, cols, mean, std, out=None, tmp=None):
    """``resample`` with the channels interleaved: two batched matmuls whose last one writes the
    (N, S, S*3) = NHWC result directly. Columns first: cols (N, S, B) @ img^T (N, B cols,
    B rows * 3) gives (N, S cols, B rows, 3); a small transpose to (N, B rows, S cols * 3)
    (B/S of the output's size); then rows (N, S, B) @ it = (N, S rows, S cols * 3)."""
    n, size, side = len(images), rows.shape[1], images.shape[1]
    x = images.to(torch.float32).div_(255)
    x = (x - mean.view(3)) / std.view(3)  # (N, B rows, B cols, 3)
    x = x.transpose(1, 2).reshape(n, side, side * 3)  # (N, B cols, B rows * 3)
    x = torch.matmul(cols, x, out=tmp)  # (N, S cols, B rows * 3)
    x = x.view(n, size, side, 3).transpose(1, 2).reshape(n, side, size * 3)  # (N, B rows, S cols * 3)
    x = torch.matmul(rows, x, out=out)  # (N, S rows, S cols * 3)
    return x.view(n, size, size, 3).permute(0, 3, 1, 2)  # a channels_last (N, 3, S, S) view


def resample_buffers(n, size, channels_last=False, side=32, kernels=False):
    """(out, tmp) of the shapes ``resample`` writes from ``side`` px images; with ``kernels``,
    (out, None) for ``resample_kernels``."""
    if kernels:
        return torch.empty(n, size, size * 3), None
    if channels_last:
        return torch.empty(n, size, size * 3), torch.empty(n, size, side * 3)
    return torch.empty(n, 3, size, size), torch.empty(n, 3, side, size)


# ----------------------------------------------------------------------------------------------
# The same flip + crop + resize by torch's uint8 resize kernels, for large stored images.
#
# The two matmuls cost S * B * (B + S) multiply-adds per channel: little for CIFAR-10's 32 px, but
# 67 M per image for an image folder cached at 224 px (under 700 img/s on two cores). Enlarging a
# crop bilinearly reads 2 input pixels per output pixel; torch's uint8 kernels (those behind
# torchvision's tensor Resize, antialiased like PIL) do it about 6x faster on the same cores
# (benchmarks/folder_bench.py). They round to uint8 after each resize, as PIL does in the seed's
# pipeline. On a GPU the matmuls stay: dense batched matmuls are what it does fastest.
KERNEL_SIDE = 64  # stored sides above this take the kernels on the CPU (at 64 px both are as fast)


def uses_kernels(side, device):
    return torch.device(device).type == "cpu" and side > KERNEL_SIDE


def normalise_rows(size):
    """(scale, shift) as rows of S*3 values: an NHWC batch viewed as (N*S, S*3) is normalised by
    one broadcast over its last dimension, which vectorises (a (3,) broadcast does not: 4x slower)."""
    scale = torch.tensor([1 / (255 * s) for s in STD]).repeat(size)
    shift = torch.tensor([-m / s for m, s in zip(MEAN, STD)]).repeat(size)
    return scale, shift


def resample_kernels(images, size, crops=None, out=None):
    """uint8 (N, B, B, 3) -> normalised float32 (N, 3, S, S) in channels_last memory, as
    ``resample`` computes it: Resize(S) of the whole batch, then per image its flip and crop box
    (``crops``: top, left, side, flip, as ``draw_crops`` returns them) resized back to S.
    ``out`` (N, S, S*3) float32 is filled when given."""
    resize = torch.nn.functional.interpolate
    n = len(images)
    x = images.permute(0, 3, 1, 2)  # a channels_last NCHW view: what the uint8 kernels read
    if images.shape[1] != size:
        x = resize(x, size=(size, size), mode="bilinear", antialias=True)
    out = torch.empty(n, size, size * 3, device=images.device) if out is None else out
    scale, shift = (v.to(images.device) for v in normalise_rows(size))
    if crops is None:
        flat = out.view(n * size, size * 3)
        flat.copy_(x.permute(0, 2, 3, 1).reshape(n * size, size * 3))
        torch.addcmul(shift, flat, scale, out=flat)
        return out.view(n, size, size, 3).permute(0, 3, 1, 2)
    # one call per image, in this thread: on two cores 2x faster than stacking the crops of equal
    # size into batched calls; worker threads were slower still (each brings its own OpenMP team).
    # Each image is normalised while its pixels are still in the cache.
    for i, (top, left, side, flip) in enumerate(zip(*(c.tolist() for c in crops))):
        if flip:  # the box on the mirrored image is the mirrored box on this one
            left = size - left - side
        # enlarging (side <= size): antialiasing changes no pixel, its kernel is just slower
        crop = resize(x[i:i + 1, :, top:top + side, left:left + side], size=(size, size), mode="bilinear",
                      antialias=False)[0].permute(1, 2, 0)  # (S, S, 3)
        if flip:
            crop = crop.flip(1)
        image = out[i]
        image.copy_(crop.reshape(size, size * 3))
        torch.addcmul(shift, image, scale, out=image)
    return out.view(n, size, size, 3).permute(0, 3, 1, 2)


class TensorLoader:
    """Batches (x, y) from uint8 images held as one tensor on ``device``, or read from an image
    folder's memory-mapped cache (folders.ImageRows: only each batch's rows, then moved).

    ``train`` means shuffled, last partial batch dropped (as the seed's loader) and, with
    ``augment``, the seed's random flip and crop. Shuffling and augmentation draws are a pure
    function of (seed, epoch), so a resumed run sees exactly the batches an uninterrupted one
    would. Under DDP every rank draws the same global batch and keeps its own slice of it.

    Images stored above KERNEL_SIDE px are resampled on the CPU by torch's uint8 kernels
    (``resample_kernels``), smaller ones and every batch on a GPU by the matmuls (``resample``);
    ``kernels`` forces one or the other.

    On the CPU each batch is written into one reused buffer: a batch is valid until the next one
    is drawn (clone it to keep it).
    """

    def __init__(self, images, labels, batch_size, image_size, train, device, seed=0, augment=True,
                 rank=0, world_size=1, channels_last=False, kernels=None):
        self.device = torch.device(device)
        mapped = isinstance(images, folders.ImageRows)  # stays on disk: read per batch
        self.images = images if mapped else torch.as_tensor(images).to(self.device)
        self.labels = torch.as_tensor(labels).to(self.device)
        self.batch_size, self.size, self.train, self.augment = batch_size, image_size, train, train and augment
        self.seed, self.rank, self.world_size, self.channels_last = seed, rank, world_size, channels_last
        self.side = images.shape[1]  # 32 for CIFAR-10, an image folder's base size
        self.kernels = uses_kernels(self.side, self.device) if kernels is None else kernels
        self.resize = resize_matrix(self.side, image_size).to(self.device, torch.float32)
        self.mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)
        self.epoch, self.start_step = 0, 0
        self.buffer = None

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        return num_batches(len(self.images), self.batch_size, self.train)

    def _buffers(self, n):
        """(out, tmp) for ``resample``: reused on the CPU; the CUDA caching allocator reuses already."""
        if self.device.type != "cpu":
            return None, None
        stale = self.buffer is not None and self.buffer[0].is_inference() and not torch.is_inference_mode_enabled()
        if self.buffer is None or len(self.buffer[0]) < n or stale:  # inference tensors stay in inference mode
            self.buffer = resample_buffers(n, self.size, self.channels_last, self.side, self.kernels)
        return tuple(b if b is None else b[:n] for b in self.buffer)

    def __iter__(self):
        n = len(self.images)
        # drawn on the CPU whatever the device, then moved (once an epoch): a run resumed on
        # another device (--device may change) sees the same order and crops
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=g).to(self.device) if self.train else torch.arange(n, device=self.device)
        if self.augment:
            crops = [c.to(self.device) for c in draw_crops(n, self.size, g, "cpu")]
        for step in range(self.start_step, len(self)):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            idx = idx[self.rank::self.world_size]  # this rank's share of the global batch
            yield self.batch(idx, [c[idx] for c in crops] if self.augment else None), self.labels[idx]
        self.start_step = 0

    def batch(self, idx, crops=None):
        """The images ``idx`` resized and normalised, flipped and cropped by ``crops`` when given
        (top, left, side, flip per image, as ``draw_crops`` returns them)."""
        idx = torch.as_tensor(idx, device=self.device)
        if self.kernels:
            x = resample_kernels(self.rows(idx), self.size, crops, self._buffers(len(idx))[0])
            return x if self.channels_last else x.contiguous()
        if crops is not None:
            rows, cols = augment_matrices(self.resize, *crops)
        else:
            rows = cols = self.resize.expand(len(idx), -1, -1)
        return resample(self.rows(idx), rows, cols, self.mean, self.std, *self._buffers(len(idx)),
                        channels_last=self.channels_last)

    def rows(self, idx):
        """The uint8 images ``idx`` on the device."""
        if isinstance(self.images, folders.ImageRows):
            return torch.from_numpy(self.images[idx]).to(self.device, non_blocking=True)
        return self.images[idx]


def epoch_seed(seed, epoch):
    return seed * 100_003 + epoch


def num_batches(n, batch_size, drop_last):
    return n // batch_size if drop_last else -(-n // batch_size)


class _GlobalBatchSampler(torch.utils.data.Sampler):
    """The same global batches as TensorLoader (seeded order, this rank's slice of each batch),
    from a given step on, so the PIL path is resumable mid-epoch too. With ``draws``, each index
    comes as (index, seed) for ArrayDataset: one seed per image and epoch, a function of (seed,
    epoch, image index) only."""

    def __init__(self, n, train, seed, batch_size, rank, world_size, draws=False):
        self.n, self.train, self.seed, self.batch_size = n, train, seed, batch_size
        self.rank, self.world_size, self.draws = rank, world_size, draws
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):  # the whole epoch's, as TensorLoader's: train.py numbers steps from start_step
        return num_batches(self.n, self.batch_size, self.train)

    def __iter__(self):
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=g) if self.train else torch.arange(self.n)
        seeds = torch.randint(1 << 62, (self.n,), generator=g).tolist() if self.draws else None
        for step in range(self.start_step, len(self)):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size][self.rank::self.world_size].tolist()
            yield [(i, seeds[i]) for i in idx] if self.draws else idx
        self.start_step = 0


class PILLoader(DataLoader):
    """The seed's path: a DataLoader over PIL transforms, with ``set_epoch`` like TensorLoader.

    Each image's augmentation draws come from its own seed, a function of (seed, epoch, image
    index): a resumed run sees exactly the batches an uninterrupted one would, with any number of
    workers. torch's global RNG is neither read nor advanced (the DataLoader's own generator
    gives the workers' base seed)."""

    def __init__(self, images, labels, batch_size, image_size, train, workers, seed=0, augment=True,
                 rank=0, world_size=1, pin_memory=False):
        draws = train and augment
        transform = seed_train_transform(image_size) if draws else eval_transform(image_size)
        self.batches = _GlobalBatchSampler(len(images), train, seed, batch_size, rank, world_size, draws)
        super().__init__(ArrayDataset(images, labels, transform), batch_sampler=self.batches,
                         num_workers=workers, pin_memory=pin_memory, generator=torch.Generator())
        self.seed = seed

    def set_epoch(self, epoch, start_step=0):
        self.batches.set_epoch(epoch, start_step)


# ----------------------------------------------------------------------------------------------
# The data set a --data-dir holds


@dataclass
class DataSet:
    """What ``open_dataset`` returns: images (uint8 (N, B, B, 3) arrays or folders.ImageRows) and
    labels per split; 'val' is a folder's own val/ (None: hold out from train), 'test' is None
    when a folder has no test/."""
    name: str  # "cifar10" or "folder:<name>": names the test set in the predictions files
    classes: list
    train: tuple
    val: tuple = None
    test: tuple = None


def is_folder(data_dir):
    return folders.is_image_folder(data_dir)


def classes_of(data_dir):
    """The class names of --data-dir without reading any image: CIFAR-10's ten, or an image
    folder's (its layout checked: one line, exit 2, when it is not usable)."""
    return folders.classes_of(data_dir) if is_folder(data_dir) else list(CLASSES)


def cifar_held_out(val_split):
    """How many of CIFAR-10's 50,000 training images --val-split holds out (a count, or a fraction
    of each class's 5,000)."""
    return val_split if val_split >= 1 else round(val_split * 5000) * 10


def default_val_split(data_dir):
    return FOLDER_VAL_FRACTION if is_folder(data_dir) else CIFAR_VAL_SPLIT


def open_dataset(data_dir="cifar", image_size=224, download=True, cache_dir="cache", strict=False, log=print,
                 stop=None):
    """CIFAR-10 (the default), or the image folder at ``data_dir`` (it has a train/ folder),
    decoded once into its cache under ``cache_dir`` at the base size for ``image_size``."""
    if isinstance(data_dir, DataSet):
        return data_dir
    if is_folder(data_dir):
        found = folders.load(data_dir, image_size, cache_dir, strict, log, stop)
        return DataSet(found.name, found.classes, *(found.splits[s] for s in folders.SPLITS))
    train_x, train_y, test_x, test_y = load_cifar10(data_dir, download)
    return DataSet(DATASET, list(CLASSES), (train_x, train_y), None, (test_x, test_y))


def check_classes(trained, found, checkpoint, data_dir):
    """One line when a checkpoint's classes are not those of the data set it is used on."""
    if list(trained) == list(found):
        return
    shown = lambda names: ", ".join(n if n.isprintable() else repr(n) for n in names[:5])  # one line
    missing, extra = [c for c in trained if c not in found], [c for c in found if c not in trained]
    what = (f"{len(trained)} classes against {len(found)}" if len(trained) != len(found) else "other classes")
    detail = "; ".join(part for part in (f"not in the data: {shown(missing)}" if missing else "",
                                          f"not in the checkpoint: {shown(extra)}" if extra else "")
                       if part) or "the same names in another order"
    raise UserError(f"{checkpoint} was trained on other classes than {data_dir} holds ({what}; {detail})", exit_code=2)


def data_dir_for(info, given=None):
    """Where a checkpoint's data set is: ``given`` (--data-dir), else CIFAR-10's folder
    ($CIFAR10_ROOT or cifar) for a CIFAR-10 checkpoint, else the image folder it was trained on."""
    if given:
        return given
    if list(info["classes"]) == list(CLASSES):
        return os.environ.get("CIFAR10_ROOT", "cifar")
    return info["args"].get("data_dir") or "cifar"


def open_test_set(info, checkpoint, given_dir=None, cache_dir=None, download=True, log=print):
    """The data set a checkpoint (``info`` of checkpoints.load_model) is tested on: it must hold the
    checkpoint's classes and test images (one line, exit 2, if not)."""
    where = data_dir_for(info, given_dir)
    check_classes(info["classes"], classes_of(where), checkpoint, where)
    dataset = open_dataset(where, info["image_size"], download, cache_dir or info["args"].get("cache_dir") or "cache",
                           log=log)
    if dataset.test is None:
        raise UserError(f"{where} has no test/ folder: no test images (classify files with --images)", exit_code=2)
    return dataset


def test_count(dataset):
    return 0 if dataset.test is None else len(dataset.test[1])


# ----------------------------------------------------------------------------------------------
# One entry point


def get_loaders(data_dir="cifar", batch_size=128, image_size=224, device="cpu", workers=2,
                val_split=5000, train_subset=None, test_subset=None, seed=0, download=True,
                data_path="tensor", augment=True, eval_batch_size=None, rank=0, world_size=1,
                channels_last=False, shuffle_train=True, split_seed=None, cache_dir="cache"):
    """{'train', 'val', 'test'} loaders over the splits; 'val' is None when val_split is 0, 'test'
    when the data set has none. ``data_dir``: a folder, or a DataSet from ``open_dataset``.

    ``batch_size`` is the global batch: under DDP each of ``world_size`` ranks gets its slice.
    ``shuffle_train=False`` gives every training image once, in order (to cache features).
    ``seed`` draws the batches and augmentations, and the splits unless ``split_seed`` is given.
    """
    splits = get_splits(data_dir, val_split, train_subset, test_subset, seed if split_seed is None else split_seed,
                        download, image_size, cache_dir)
    if len(splits["train"][1]) < batch_size:
        raise UserError(f"--batch-size {batch_size} is larger than the {len(splits['train'][1])} training images", exit_code=2)

    def make(x, y, bs, train):
        if data_path == "tensor":
            return TensorLoader(x, y, bs, image_size, train, device, seed, augment,
                                rank, world_size, channels_last)
        if data_path == "pil":
            return PILLoader(x, y, bs, image_size, train, workers, seed, augment, rank, world_size,
                             pin_memory=torch.device(device).type == "cuda")
        raise UserError(f"unknown data path {data_path!r} (tensor or pil)")

    eval_bs = eval_batch_size or batch_size
    return {name: None if split is None else make(*split, batch_size if name == "train" else eval_bs,
                                                  shuffle_train if name == "train" else False)
            for name, split in splits.items()}


def split_seed(run_args):
    """The seed a run's splits are drawn with (train.py --split-seed, else --seed), from its
    arguments as a dict (a checkpoint's "args", or vars(args))."""
    chosen = run_args.get("split_seed")
    return run_args["seed"] if chosen is None else chosen


def test_indices(test_subset=None, seed=0, n_test=TEST_IMAGES):
    """Which of the test images a run tests on, in order: all, or its seeded --test-subset. Stored
    with every run's predictions, so two runs are compared on the same images only."""
    return subset(np.arange(n_test), test_subset, seed)


def get_splits(data_dir="cifar", val_split=5000, train_subset=None, test_subset=None, seed=0, download=True,
               image_size=224, cache_dir="cache"):
    """{'train', 'val', 'test'}: (uint8 images (N, B, B, 3), int64 labels); 'val' is None when
    val_split is 0, 'test' when the data set has no test images. The validation images are a
    folder's val/, else a seeded class-balanced hold-out of the training set. ``data_dir``: a
    folder or a DataSet (``open_dataset``)."""
    ds = open_dataset(data_dir, image_size, download, cache_dir)
    train_x, train_y = ds.train
    if ds.val is not None:
        train_idx, val = np.arange(len(train_y)), ds.val
    elif val_split:
        train_idx, val_idx = split_train_val(train_y, val_split, seed)
        val = (train_x.take(val_idx, axis=0), train_y[val_idx])
    else:
        train_idx, val = np.arange(len(train_y)), None
    train_idx = subset(train_idx, train_subset, seed)
    test = None
    if ds.test is not None:
        test_idx = test_indices(test_subset, seed, len(ds.test[1]))
        test = (ds.test[0].take(test_idx, axis=0), ds.test[1][test_idx])
    return {"train": (train_x.take(train_idx, axis=0), train_y[train_idx]), "val": val, "test": test}


def images_digest(images, labels):
    """sha256 of a split's images and labels (the frozen models' feature cache keys on it): of the
    bytes for arrays, read in chunks; an image folder's rows know what they hold without reading."""
    digest = hashlib.sha256()
    if isinstance(images, folders.ImageRows):
        digest.update(images.digest().encode())
    else:
        images = np.asarray(images)
        for start in range(0, len(images), 4096):
            digest.update(np.ascontiguousarray(images[start:start + 4096]).tobytes())
    digest.update(np.ascontiguousarray(labels).tobytes())
    return digest.hexdigest()
