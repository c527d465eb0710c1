"""The feature cache of the frozen models: the backbone runs once per image, the head trains on disk.

`resnet` and `resnet_att` never change their ResNet-50, so without augmentation (`--no-augment`)
the backbone's output for an image is the same in every epoch and every run. It is computed once,
in one batched inference pass per split, and written under ``--cache-dir``:

    cache/<split>-<size>px-<count>-<key>/
        meta.json      what the features depend on (the key's fields), shapes, dtypes
        labels.npy     int64 (N,)
        pooled.npy     float32 (N, 2048): the global average of layer4, for `resnet`'s FC
        maps.npy       float16 (N, 2048, h, w): layer4 itself, for `resnet_att`'s conv head; read
                       memory-mapped (about 9 GB for 45,000 images at 224 px)
        progress.json  the chunks written so far, each with a CRC-32 per array

The key hashes everything that changes the features: the backbone's own tensors (so torchvision's
weights, a weights file and a checkpoint's frozen copy of either all give the same key when the
numbers are the same) and its stride layout, the image size, the images and labels of the split
themselves, the preprocessing and the dtypes. Runs of either frozen model, and later runs, reuse
an entry; one extraction writes both arrays when `resnet_att` asks, so `resnet` then costs nothing.

Extraction writes CHUNK images at a time, each flushed to disk before it is recorded as done, so an
interrupted extraction (Ctrl-C, kill, power) resumes at the first chunk not recorded. Every read
checks shapes, counts and the CRC of every chunk it uses; a damaged chunk is recomputed after a
one-line warning, never used.
"""
import hashlib
import json
import os
import shutil
import zlib

import numpy as np
import torch

import data
import engine
from report import Progress
from utils import UserError, atomic_write_text

FORMAT = 1
CHUNK = 256  # images per chunk: the unit of resume and of checksums (~20 s on two CPU cores)
EXTRACT_BATCH = 32  # fastest ResNet-50 inference batch on the 2-core CPUs (benchmarks/extract_bench.py)
MAP_DTYPE = "float16"  # default storage of layer4 maps: 200 KB an image at 224 px (float32: 400 KB)
PREPROCESS = "tensor-path-eval-v1"  # data.TensorLoader without augmentation: Resize, Normalize
KINDS = ("pooled", "maps")


# ----------------------------------------------------------------------------------------------
# What the features depend on


def sha256_of_tensors(tensors):
    digest = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def autocast_dtype(autocast):
    """The dtype the backbone computes in under ``autocast`` (a torch.autocast, or a null context:
    float32): part of the key, so float32 and bfloat16 features never mix."""
    if isinstance(autocast, torch.autocast) and autocast._enabled:
        return autocast.fast_dtype
    return torch.float32


def cache_key(model, images, labels, image_size, compute_dtype, map_dtype=MAP_DTYPE):
    """The fields an entry is keyed by (plain types), and its 16-hex-digit digest."""
    fields = {
        "format": FORMAT,
        "backbone_sha256": sha256_of_tensors(sorted(model.backbone.state_dict().items())),
        "stride_in_1x1": bool(model.stride_in_1x1),
        "image_size": int(image_size),
        "images_sha256": data.images_digest(images, labels),
        "count": len(images),
        "preprocess": PREPROCESS,
        "compute_dtype": str(compute_dtype).replace("torch.", ""),
        "map_dtype": np.dtype(map_dtype).name,
    }
    return fields, hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# One entry on disk


class CacheEntry:
    """The arrays of one split's features, written in chunks, checked when read."""

    def __init__(self, folder, fields, map_shape):
        self.folder, self.fields, self.n = folder, fields, fields["count"]
        self.shapes = {"pooled": (self.n, map_shape[0]), "maps": (self.n, *map_shape)}
        self.dtypes = {"pooled": np.dtype(np.float32), "maps": np.dtype(fields["map_dtype"])}
        self.chunks = -(-self.n // CHUNK)

    def path(self, name):
        return os.path.join(self.folder, name)

    def chunk_range(self, i):
        return i * CHUNK, min((i + 1) * CHUNK, self.n)

    # -- state ------------------------------------------------------------------------------
    def read_progress(self):
        """{chunk index: {kind: crc}} of the chunks recorded as written; {} when unreadable."""
        try:
            with open(self.path("meta.json")) as f:
                meta = json.load(f)
            with open(self.path("progress.json")) as f:
                done = json.load(f)["chunks"]
            if meta.get("key") != self.fields:
                return {}
            return {int(i): crc for i, crc in done.items() if isinstance(crc, dict)}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def write_progress(self, done):
        atomic_write_text(self.path("progress.json"), json.dumps({"chunks": {str(i): done[i] for i in sorted(done)}}))

    def kinds(self):
        try:
            with open(self.path("meta.json")) as f:
                return set(json.load(f).get("kinds", []))
        except (OSError, ValueError, AttributeError):
            return set()

    def create(self, kinds, labels):
        """A new, empty entry holding ``kinds``: the old files of this folder go first."""
        shutil.rmtree(self.folder, ignore_errors=True)
        os.makedirs(self.folder)
        np.save(self.path("labels.npy"), np.asarray(labels, dtype=np.int64))
        for kind in kinds:  # sparse files of the full size; chunks are written into them
            np.lib.format.open_memmap(self.path(f"{kind}.npy"), "w+", self.dtypes[kind], self.shapes[kind])
        self.write_progress({})
        meta = {"key": self.fields, "kinds": sorted(kinds), "shapes": {k: self.shapes[k] for k in kinds}}
        atomic_write_text(self.path("meta.json"), json.dumps(meta, indent=1))

    def open(self, kind, mode="r"):
        """The array ``kind``, memory-mapped; None when the file is missing or of another shape."""
        try:
            arr = np.load(self.path(f"{kind}.npy"), mmap_mode=mode, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if arr.shape != self.shapes[kind] or arr.dtype != self.dtypes[kind]:
            return None
        return arr

    def labels_ok(self, labels):
        try:
            return np.array_equal(np.load(self.path("labels.npy"), allow_pickle=False), labels)
        except (OSError, ValueError, EOFError):
            return False

    # -- writing ----------------------------------------------------------------------------
    def write_chunk(self, i, arrays):
        """Write chunk ``i`` of every kind, make it durable, return its CRCs."""
        crcs = {}
        for kind, values in arrays.items():
            mm = self.open(kind, "r+")
            start, stop = self.chunk_range(i)
            mm[start:stop] = values
            mm.flush()  # msync: on disk before progress.json says so
            crcs[kind] = zlib.crc32(np.ascontiguousarray(mm[start:stop]))
            del mm
        return crcs

    def bad_chunks(self, done, kinds):
        """The recorded chunks whose bytes no longer match their CRC, for ``kinds``."""
        bad = set()
        for kind in kinds:
            arr = self.open(kind)
            if arr is None:
                return set(done)
            for i, crcs in done.items():
                start, stop = self.chunk_range(i)
                if i >= self.chunks or crcs.get(kind) != zlib.crc32(np.ascontiguousarray(arr[start:stop])):
                    bad.add(i)
        return bad


# ----------------------------------------------------------------------------------------------
# Extraction


def bytes_per_image(kinds, map_shape, map_dtype):
    per = {"pooled": 4 * map_shape[0], "maps": np.dtype(map_dtype).itemsize * int(np.prod(map_shape))}
    return sum(per[k] for k in kinds)


def check_free_space(folder, needed):
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise UserError(f"the feature cache needs {needed / 1e9:.1f} GB more in {os.path.abspath(folder)}, "
                        f"only {free / 1e9:.1f} GB are free; free some space or pass --cache-dir elsewhere")


@torch.inference_mode()
def backbone_outputs(model, x):
    """(pooled float32 (B, 2048), map float32 (B, 2048, h, w)) of the frozen backbone."""
    fmap = model.features(x).float()
    return fmap.mean(dim=(2, 3)), fmap


def extract(model, entry, images, labels, kinds, device, autocast, todo, done, what, stop=None):
    """Compute the chunks ``todo`` and record each in progress.json as soon as it is on disk."""
    loader = data.TensorLoader(images, labels, EXTRACT_BATCH, entry.fields["image_size"], train=False,
                               device=device, channels_last=True)
    model.eval()
    todo = sorted(todo)
    bar = Progress(sum(np.subtract(*entry.chunk_range(i)[::-1]) for i in todo), f"extracting {what}", unit="img")
    try:
        for i in todo:
            start, stop_at = entry.chunk_range(i)
            outs = {k: [] for k in kinds}
            for b in range(start, stop_at, EXTRACT_BATCH):
                if stop is not None:
                    stop.exit_if_requested(f"during the extraction of {what}: {len(done)} of {entry.chunks} "
                                           f"chunks are cached, the same command continues from there")
                x = loader.batch(np.arange(b, min(b + EXTRACT_BATCH, stop_at)))
                with autocast:
                    pooled, fmap = backbone_outputs(model, x)
                if "pooled" in kinds:
                    outs["pooled"].append(pooled.cpu().numpy())
                if "maps" in kinds:
                    outs["maps"].append(fmap.cpu().numpy().astype(entry.dtypes["maps"]))
                bar.update(len(x))
            done[i] = entry.write_chunk(i, {k: np.concatenate(v) for k, v in outs.items()})
            entry.write_progress(done)
    finally:
        bar.close()


def cached_features(model, split, images, labels, kind, cache_dir, image_size, device, autocast, log, stop=None,
                    map_dtype=MAP_DTYPE):
    """The features ``kind`` ('pooled' or 'maps') of these images: from the cache when it holds
    them intact, else computed (missing or damaged chunks only) and written there first.
    Returns a read-only numpy array (memory-mapped for maps)."""
    compute_dtype = autocast_dtype(autocast)
    fields, key = cache_key(model, images, labels, image_size, compute_dtype, map_dtype)
    with torch.inference_mode():
        probe = torch.zeros(1, 3, image_size, image_size, device=device)
        map_shape = tuple(model.features(probe).shape[1:])
    folder = os.path.join(cache_dir, f"{split}-{image_size}px-{len(images)}-{key}")
    entry = CacheEntry(folder, fields, map_shape)
    os.makedirs(cache_dir, exist_ok=True)

    done = entry.read_progress() if entry.labels_ok(labels) else {}
    kinds = entry.kinds() if done else set()
    if kind not in kinds:  # new, unreadable, or lacking this kind: (re)create it, pooled always
        if done:
            log.info(f"feature cache {folder}: adding {kind}, recomputing the entry (one pass writes both)")
        kinds = kinds | {kind, "pooled"}
        check_free_space(cache_dir, bytes_per_image(kinds, map_shape, fields["map_dtype"]) * len(images))
        entry.create(kinds, labels)
        done = {}
    bad = entry.bad_chunks(done, [kind])
    if bad:
        log.warning(f"feature cache {folder}: {len(bad)} damaged chunk(s) ({CHUNK} images each) fail their "
                    f"checksum; recomputing them")
        done = {i: c for i, c in done.items() if i not in bad}
        entry.write_progress(done)
    todo = [i for i in range(entry.chunks) if i not in done]
    if todo:
        log.info(f"computing the frozen backbone's {' and '.join(sorted(kinds))} features of the {len(images):,} "
                 f"{split} images at {image_size} px ({len(todo)} of {entry.chunks} chunks to go) into {folder}")
        extract(model, entry, images, labels, sorted(kinds), device, autocast, todo, done, f"{split} features",
                stop)
    else:
        log.info(f"{split}: {len(images):,} images' {kind} features from the cache {folder}")
    arr = entry.open(kind)
    written = {i: c for i, c in entry.read_progress().items() if i in todo}  # the rest was checked above
    if arr is None or entry.bad_chunks(written, [kind]):  # written and read back wrong
        raise UserError(f"feature cache {folder} cannot be read back intact; delete it and run again")
    return arr


# ----------------------------------------------------------------------------------------------
# Batches of cached features


class FeatureLoader:
    """Batches (features, label) from a cache array, in the image loaders' order: shuffled per
    epoch from (seed, epoch) on a CPU generator, the last partial batch dropped in training, so the
    head sees exactly the batches it would see through the backbone. Pooled vectors come as
    (B, 2048, 1, 1) maps, so the one ``Head`` serves both kinds."""

    def __init__(self, features, labels, batch_size, train, seed, device):
        self.features, self.labels = features, torch.as_tensor(np.asarray(labels))
        self.batch_size, self.train, self.seed, self.device = batch_size, train, seed, device
        self.epoch = self.start_step = 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        return data.num_batches(len(self.labels), self.batch_size, self.train)

    def __iter__(self):
        n = len(self.labels)
        g = torch.Generator().manual_seed(data.epoch_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        for step in range(self.start_step, len(self)):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size].numpy()
            x = torch.from_numpy(np.ascontiguousarray(self.features[idx])).to(self.device).float()
            if x.dim() == 2:
                x = x[:, :, None, None]
            yield x, self.labels[idx].to(self.device)
        self.start_step = 0


def cached_loaders(model, splits, cache_dir, image_size, batch_size, eval_batch_size, seed, device, autocast, log,
                   stop=None, map_dtype=MAP_DTYPE):
    """{'train', 'val', 'test'} FeatureLoaders over the cached features of ``splits`` (from
    data.get_splits): layer4 maps when the head has layers of its own, else the pooled vectors."""
    kind = "maps" if list(model.head.body.parameters()) else "pooled"
    if len(splits["train"][1]) < batch_size:
        raise UserError(f"--batch-size {batch_size} is larger than the {len(splits['train'][1])} training images",
                        exit_code=2)
    loaders = {}
    for name, split in splits.items():
        if split is None:
            loaders[name] = None
            continue
        arr = cached_features(model, name, *split, kind, cache_dir, image_size, device, autocast, log, stop, map_dtype)
        if kind == "pooled":
            arr = np.array(arr)  # 8 KB an image: in memory
        train = name == "train"
        loaders[name] = FeatureLoader(arr, split[1], batch_size if train else eval_batch_size, train, seed, device)
    return loaders


def make_loaders(args, model, rt, log, stop, dataset):
    """train.py's inputs: -> (loaders, the module they feed). A frozen backbone without augmentation
    sees each image the same way in every epoch, so its features come from the cache and only
    ``model.head`` trains (single process only); every other run trains ``model`` on images."""
    eval_bs = args.batch_size * engine.EVAL_BATCH_FACTOR
    if not (args.no_augment and rt.world_size == 1 and getattr(model, "frozen", False) and not args.no_probe):
        return data.get_loaders(
            dataset, args.batch_size, args.image_size, rt.device, args.workers, args.val_split,
            args.train_subset, args.test_subset, args.seed, not args.no_download, args.data_path,
            augment=not args.no_augment, eval_batch_size=eval_bs, rank=rt.rank, world_size=rt.world_size,
            channels_last=True, split_seed=data.split_seed(vars(args))), model
    splits = data.get_splits(dataset, args.val_split, args.train_subset, args.test_subset,
                             data.split_seed(vars(args)))
    loaders = cached_loaders(model, splits, args.cache_dir, args.image_size, args.batch_size, eval_bs,
                             args.seed, rt.device, rt.autocast, log, stop, args.cache_dtype)
    log.info(f"{'head' if list(model.head.body.parameters()) else 'linear probe'} training on cached features "
             f"({args.cache_dir})")
    return loaders, model.head
