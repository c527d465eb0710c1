"""Your own images: a folder of class folders, read like CIFAR-10.

    PATH/train/<class>/<image>     required: the class names and their order come from here
    PATH/val/<class>/<image>       optional: the validation images (else a seeded hold-out of train/)
    PATH/test/<class>/<image>      optional: the test images (else no test pass)

This is the layout of torchvision's ImageFolder and timm: classes as
``torchvision.datasets.folder.find_classes`` orders them (sorted names), images with its
extensions (IMG_EXTENSIONS, any case), hidden files and folders ignored. Within a split the images
are ordered by their path below the class folder, then by class, so a data set written with
numbered files (tools/cifar_to_folder.py) keeps its original order and its seeded splits.

Each image is decoded once (any mode: grayscale, palette, RGBA, 16-bit, CMYK -> RGB), its shorter
side resized to the base size, centre-cropped square and kept in an on-disk uint8 cache
(``<cache-dir>/images/<folder>-<hash>-<base>px/images.u8``, N x base x base x 3), read
memory-mapped: a 50,000-image folder at 224 px is 7.5 GB of cache, never loaded whole. Training then
runs data.py's batched flip + crop + resize path from the base size, as for CIFAR-10's 32 px.

The base size is --image-size (the seed's first transform, Resize(224), done once here), but never
more than the largest image's shorter side: a folder of 32 px images is cached at 32 px, as they
are, so the cache never stores upsampled pixels.

The cache is keyed by every file's path, size and modification time, and the base size: a changed
folder rebuilds it, saying why in one line. It is written in chunks, each flushed before it is
recorded, into ``<name>.partial/``, renamed into place when whole: an interrupted caching (^C,
kill -9) resumes at its first unrecorded chunk, and nothing half-written is ever read.

Files that are not usable images (truncated, corrupt, empty, not an image, a decompression bomb,
smaller than MIN_SIDE px, more elongated than MAX_ASPECT:1) are skipped, counted and named in one
warning, and listed in ``skipped.txt`` beside the cache; ``strict=True`` (train.py --strict) makes
the first of them an error.
"""
import hashlib
import json
import math
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS

from utils import UserError, atomic_write_text, first_line

SPLITS = ("train", "val", "test")
FORMAT = 1  # of the cache: bump when decoding changes, so old caches rebuild
CHUNK = 512  # images per chunk: the unit of resume (about half a second at 224 px on two cores)
MIN_SIDE = 8  # px: smaller images are skipped (a 1-pixel "image" is a broken export, not a photo)
MAX_ASPECT = 16  # as data.load_image: a 1 x 10,000 strip is not a picture to classify
WORKERS = 2  # decoding threads: PIL releases the GIL while it decodes and resizes
SHOW_BAD = 3  # bad files named in the warning line; the rest are in skipped.txt


def is_image_folder(root):
    """Whether ``root`` is an image-folder data set (it has a train/ folder), not CIFAR-10."""
    return os.path.isdir(os.path.join(root, "train"))


def dataset_name(root):
    return f"folder:{os.path.basename(os.path.normpath(os.path.abspath(root)))}"


def usage(message):
    return UserError(message, exit_code=2)


# ----------------------------------------------------------------------------------------------
# The layout


def visible(name):
    return not name.startswith(".")


def class_folders(split_dir):
    """The visible sub-folders of ``split_dir``, sorted (find_classes' order, hidden ones left out)."""
    try:
        return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and visible(e.name))
    except OSError as e:
        raise usage(f"cannot read {split_dir} ({e.strerror or e})") from None


def image_files(class_dir):
    """Relative paths ('/'-separated) of the image files below ``class_dir``, sorted."""
    found = []
    for folder, dirs, files in os.walk(class_dir, followlinks=True):
        dirs[:] = [d for d in dirs if visible(d)]
        rel = os.path.relpath(folder, class_dir)
        found += [name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")
                  for name in files if visible(name) and name.lower().endswith(IMG_EXTENSIONS)]
    return sorted(found)


@dataclass
class Layout:
    root: str
    classes: list
    files: dict  # split -> [(path relative to root, label)], or None when the split folder is absent


def scan(root):
    """The folder's classes and image files, or one line (exit 2) saying what is wrong with it."""
    train_dir = os.path.join(root, "train")
    classes = class_folders(train_dir)
    odd = [c for c in classes if not c.isprintable()]
    if odd:  # a checkpoint records the names: they must print on one line
        raise usage(f"{train_dir} has class folder names with line breaks or control characters: "
                    f"{', '.join(repr(c) for c in odd[:3])}; rename them")
    if len(classes) < 2:
        raise usage(f"{train_dir} holds {len(classes)} class folder(s): at least two are needed "
                    f"(train/<class>/<image>)")
    files = {}
    for split in SPLITS:
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            files[split] = None
            continue
        extra = sorted(set(class_folders(split_dir)) - set(classes))
        if extra:
            raise usage(f"{split_dir} has class folder(s) that train/ lacks: {', '.join(extra[:5])}")
        entries = []
        for label, name in enumerate(classes):
            class_dir = os.path.join(split_dir, name)
            if not os.path.isdir(class_dir):
                continue
            found = image_files(class_dir)
            if not found:
                raise usage(f"class folder {class_dir} holds no images ({', '.join(IMG_EXTENSIONS[:4])}, ...)")
            entries += [(rel, label, f"{split}/{name}/{rel}") for rel in found]
        if not entries:
            raise usage(f"{split_dir} holds no images")
        entries.sort(key=lambda e: (e[0], e[1]))  # path below the class folder, then class
        files[split] = [(path, label) for _, label, path in entries]
    return Layout(root, classes, files)


def classes_of(root):
    """The class names of an image folder, from its train/ folder."""
    return scan(root).classes


# ----------------------------------------------------------------------------------------------
# Decoding one image


class BadImage(Exception):
    """Why a file is not a usable image (one line)."""


def to_rgb(img):
    """Any PIL mode -> RGB. 16- and 32-bit grayscale are scaled to 8 bits (PIL's own conversion
    clips them at 255, turning most of a 16-bit image white)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        values = np.asarray(img).astype(np.int64)
        if values.max() > 255:
            values = values.clip(0, 65535) // 257
        return Image.fromarray(values.astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        return Image.fromarray((np.asarray(img).clip(0, 1) * 255).round().astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when converting such palettes straight to RGB
    return img.convert("RGB")


def decode(path, base):
    """One image file -> uint8 (base, base, 3): its shorter side resized to ``base`` (bilinear,
    antialiased, as torchvision's Resize on a PIL image), centre-cropped. Raises BadImage."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if min(w, h) < MIN_SIDE:
                    raise BadImage(f"{w}x{h} pixels, smaller than {MIN_SIDE} px on a side")
                if max(w, h) > MAX_ASPECT * min(w, h):
                    raise BadImage(f"{w}x{h} pixels, more elongated than {MAX_ASPECT}:1")
                scale = base / min(w, h)
                size = (max(base, round(w * scale)), max(base, round(h * scale)))
                if scale < 0.5:  # JPEG: decode at 1/2, 1/4 or 1/8 scale, still >= size (PIL's thumbnail does so)
                    img.draft("RGB", size)
                rgb = to_rgb(img)
                if rgb.size != size:
                    rgb = rgb.resize(size, Image.BILINEAR)
                left, top = int(round((size[0] - base) / 2)), int(round((size[1] - base) / 2))
                if size != (base, base):
                    rgb = rgb.crop((left, top, left + base, top + base))
                return np.asarray(rgb, dtype=np.uint8)
    except BadImage:
        raise
    except UnidentifiedImageError:
        size = os.path.getsize(path) if os.path.exists(path) else None
        raise BadImage("an empty file (0 bytes)" if size == 0 else "not an image (PIL cannot identify it)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("more pixels than PIL reads safely (a decompression bomb?)") from None
    except MemoryError:
        raise BadImage("too large to decode in memory") from None
    except Exception as e:  # PIL meets damaged bytes with any exception type
        raise BadImage(f"not an image PIL can read ({type(e).__name__}: {first_line(e)})") from None


def shorter_side(path):
    """The shorter side of an image from its header alone, or None when the header is unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                w, h = img.size
        return min(w, h) if min(w, h) >= MIN_SIDE and max(w, h) <= MAX_ASPECT * min(w, h) else None
    except Exception:
        return None


def base_size(image_size, sides):
    """The image size, but no more than the largest (usable) shorter side among ``sides``."""
    usable = [s for s in sides if s]
    return min(image_size, max(usable)) if usable else image_size


# ----------------------------------------------------------------------------------------------
# Rows of the cache, memory-mapped


class ImageRows:
    """Rows ``index`` of a cache's uint8 (N, S, S, 3) file, read on demand (memory-mapped), never
    loaded whole; indexes like a numpy array (an int, a slice, an array or tensor of indices).
    ``take`` selects rows without reading them, so splits and subsets cost nothing. Pickles as
    its path: DataLoader workers map the file themselves."""

    def __init__(self, path, rows, side, index, key):
        self.path, self.rows, self.side, self.index, self.key = path, rows, side, np.asarray(index, np.int64), key
        self._map = None

    @property
    def shape(self):
        return (len(self.index), self.side, self.side, 3)

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __len__(self):
        return len(self.index)

    def _file(self):
        if self._map is None:
            self._map = np.memmap(self.path, np.uint8, "r", shape=(self.rows, self.side, self.side, 3))
        return self._map

    def __getitem__(self, item):
        if isinstance(item, (int, np.integer)):
            return np.asarray(self._file()[self.index[item]])
        if hasattr(item, "cpu"):  # a torch tensor
            item = item.cpu().numpy()
        rows = self.index[item]
        order = np.argsort(rows, kind="stable")  # read in file order, then put back
        out = np.empty((len(rows), self.side, self.side, 3), np.uint8)
        out[order] = self._file()[rows[order]]
        return out

    def take(self, idx, axis=0):
        assert axis == 0
        return ImageRows(self.path, self.rows, self.side, self.index[np.asarray(idx, np.int64)], self.key)

    def __array__(self, dtype=None, copy=None):  # the whole selection: for small sets and tests
        out = self[np.arange(len(self))]
        return out if dtype is None else out.astype(dtype)

    def digest(self):
        """What these rows hold, as a hash: the cache's key (its files, sizes, times and base
        size) and the row numbers. The frozen models' feature cache keys on it."""
        return hashlib.sha256(self.key.encode() + self.index.tobytes()).hexdigest()

    def __getstate__(self):
        return {**self.__dict__, "_map": None}


# ----------------------------------------------------------------------------------------------
# The cache


def cache_folder(cache_dir, root, target):
    """One cache per (image folder, target base size): rebuilt in place when the folder changes."""
    root = os.path.abspath(root)
    tag = hashlib.sha256(root.encode()).hexdigest()[:8]
    return os.path.join(cache_dir, "images", f"{os.path.basename(os.path.normpath(root))}-{tag}-{target}px")


def file_records(layout):
    """[[path, size, mtime_ns, label, split]] of every file, in order: what the cache is keyed by."""
    records = []
    for split in SPLITS:
        for path, label in layout.files[split] or []:
            try:
                st = os.stat(os.path.join(layout.root, path))
            except OSError as e:
                raise UserError(f"cannot read {os.path.join(layout.root, path)} ({e.strerror or e})") from None
            records.append([path, st.st_size, st.st_mtime_ns, label, split])
    return records


def cache_fields(layout, records, target):
    digest = hashlib.sha256(json.dumps([layout.classes, records]).encode()).hexdigest()
    return {"format": FORMAT, "target": target, "files": digest}


def read_json(path):
    try:
        with open(path) as f:
            value = json.load(f)
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def why_rebuild(old, fields, records):
    """One line: what changed between the cache's folder and the folder now."""
    if old.get("fields", {}).get("format") != fields["format"]:
        return "the cache format changed"
    before = {r[0]: r for r in old.get("records", []) if isinstance(r, list) and r}
    now = {r[0]: r for r in records}
    added, removed = len(now.keys() - before.keys()), len(before.keys() - now.keys())
    changed = sum(1 for p in now.keys() & before.keys() if now[p] != before[p])
    parts = [f"{n} file(s) {what}" for n, what in ((added, "added"), (removed, "removed"),
                                                 (changed, "changed (size, time or class)")) if n]
    return ", ".join(parts) or "the class folders changed"


@dataclass
class FolderData:
    name: str
    classes: list
    splits: dict  # split -> (ImageRows, int64 labels) or None
    base: int
    folder: str
    skipped: int


def load(root, image_size, cache_dir="cache", strict=False, log=print, stop=None, workers=WORKERS):
    """The image folder ``root`` as uint8 rows at its base size, from the cache (built first when
    missing or stale). ``log``: one-line messages; ``stop`` (utils.StopSignals): ^C between chunks."""
    layout = scan(root)
    records = file_records(layout)
    fields = cache_fields(layout, records, image_size)
    folder = cache_folder(cache_dir, root, image_size)
    meta = read_json(os.path.join(folder, "meta.json"))
    if meta is not None and meta.get("fields") == fields:
        try:
            found = open_cache(layout, folder, meta)
            if found.skipped:
                log(f"image cache {folder}: {found.skipped} file(s) skipped as unusable, listed in "
                    f"{os.path.join(folder, 'skipped.txt')}")
            return found
        except UserError:
            raise
        except Exception as e:  # any bytes in its files: rebuilt, never trusted
            log(f"image cache {folder}: unreadable ({type(e).__name__}: {first_line(e)}); rebuilding it")
    elif meta is not None:
        log(f"image cache {folder}: {why_rebuild(meta, fields, records)} since it was built; rebuilding it")
    meta = build(layout, records, fields, folder, image_size, strict, log, stop, workers)
    return open_cache(layout, folder, meta)


def open_cache(layout, folder, meta):
    """The cache's splits; raises (ValueError, OSError, ...) when its files are not what it wrote."""
    labels = np.load(os.path.join(folder, "labels.npy"), allow_pickle=False)
    usable = np.load(os.path.join(folder, "usable.npy"), allow_pickle=False)
    split_of = np.array([r[4] for r in meta["records"]], dtype=object)
    base, rows = meta["base"], len(meta["records"])
    expected = [r[3] for r in meta["records"]]
    if not (isinstance(base, int) and base >= MIN_SIDE and labels.dtype == np.int64 and usable.dtype == bool
            and labels.tolist() == expected and usable.shape == labels.shape
            and os.path.getsize(os.path.join(folder, "images.u8")) == max(rows, 1) * base * base * 3
            and meta["skipped"] == int((~usable).sum())):
        raise ValueError("its files do not match its meta.json")
    key = hashlib.sha256(json.dumps(meta["fields"], sort_keys=True).encode()).hexdigest()
    splits = {}
    for split in SPLITS:
        if layout.files[split] is None:
            splits[split] = None
            continue
        idx = np.flatnonzero((split_of == split) & usable)
        missing = [c for i, c in enumerate(layout.classes) if split == "train" and not (labels[idx] == i).any()]
        if missing or not len(idx):
            raise usage(f"{os.path.join(layout.root, split)}: no usable images"
                        + (f" of class {', '.join(missing[:5])}" if missing else "")
                        + f" (see {os.path.join(folder, 'skipped.txt')})")
        splits[split] = (ImageRows(os.path.join(folder, "images.u8"), rows, base, idx, key), labels[idx])
    return FolderData(dataset_name(layout.root), list(layout.classes), splits, base, folder, meta["skipped"])


def build(layout, records, fields, folder, image_size, strict, log, stop, workers):
    """Decode every file into ``folder``.partial/, chunk by chunk (resuming a partial one built for
    the same files), then rename it to ``folder``. -> its meta."""
    partial = folder + ".partial"
    paths = [os.path.join(layout.root, r[0]) for r in records]
    base, done = resumable(partial, fields)
    with ThreadPoolExecutor(workers) as pool:
        if done is not None:
            log(f"image cache {folder}: resuming, {len(done)} of {-(-len(paths) // CHUNK)} chunks done")
        else:
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
            base = base_size(image_size, pool.map(shorter_side, paths, chunksize=64))
            done = {}
            check_space(partial, len(paths) * base * base * 3)
        np.save(os.path.join(partial, "labels.npy"), np.array([r[3] for r in records], np.int64))
        images = np.memmap(os.path.join(partial, "images.u8"), np.uint8, "w+" if done == {} else "r+",
                           shape=(max(len(paths), 1), base, base, 3))
        save_progress(partial, fields, base, done, len(paths))
        fill(images, paths, base, done, partial, fields, strict, stop, pool)
        del images
    bad = sorted((i, why) for chunk in done.values() for i, why in chunk)
    usable = np.ones(len(paths), bool)
    usable[[i for i, _ in bad]] = False
    np.save(os.path.join(partial, "usable.npy"), usable)
    atomic_write_text(os.path.join(partial, "skipped.txt"),
                      "".join(f"{records[i][0]}\t{why}\n" for i, why in bad))
    meta = {"fields": fields, "base": base, "image_size": image_size, "classes": layout.classes,
            "count": len(paths), "skipped": len(bad), "records": records}
    atomic_write_text(os.path.join(partial, "meta.json"), json.dumps(meta))
    shutil.rmtree(folder, ignore_errors=True)  # a crash from here on: the partial folder resumes, all chunks done
    os.replace(partial, folder)
    os.remove(os.path.join(folder, "progress.json"))
    gb = len(paths) * base * base * 3 / 1e9
    log(f"image cache {folder}: {len(paths) - len(bad):,} images at {base}x{base} px ({gb:.2f} GB)")
    if bad:
        named = "; ".join(f"{records[i][0]} ({why})" for i, why in bad[:SHOW_BAD])
        log(f"warning: skipped {len(bad)} of {len(paths)} files that are not usable images: {named}"
            f"{'; ...' if len(bad) > SHOW_BAD else ''}; all listed in {os.path.join(folder, 'skipped.txt')} "
            f"(--strict: stop instead)")
    return meta


def resumable(partial, fields):
    """(base size, {chunk: [[index, why], ...]}) of a partial cache built for ``fields`` with this
    CHUNK size, or (None, None) when there is none to resume (or its progress.json is damaged)."""
    state = read_json(os.path.join(partial, "progress.json"))
    try:
        if not (state and state["fields"] == fields and state["chunk"] == CHUNK
                and os.path.getsize(os.path.join(partial, "images.u8")) == state["count"] * state["base"] ** 2 * 3):
            return None, None
        done = {int(k): [[int(i), str(why)] for i, why in v] for k, v in state["chunks"].items()}
        if any(not 0 <= i < state["count"] for bad in done.values() for i, _ in bad):
            return None, None
        return int(state["base"]), done
    except (KeyError, TypeError, ValueError, AttributeError, OSError):
        return None, None


def check_space(folder, needed):
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise UserError(f"the image cache needs {needed / 1e9:.1f} GB in {os.path.abspath(folder)}, only "
                        f"{free / 1e9:.1f} GB are free; free some space or pass --cache-dir elsewhere")


def save_progress(partial, fields, base, done, count):
    atomic_write_text(os.path.join(partial, "progress.json"),
                      json.dumps({"fields": fields, "base": base, "chunk": CHUNK, "count": max(count, 1),
                                  "chunks": {str(k): v for k, v in done.items()}}))


def decode_or_reason(path, base):
    try:
        return decode(path, base), None
    except BadImage as e:
        return None, str(e)


def fill(images, paths, base, done, partial, fields, strict, stop, pool):
    """Decode the chunks not in ``done`` into ``images``; each is flushed before it is recorded."""
    from report import Progress  # the reporting room: progress lines (what, how far, img/s, ETA)
    chunks = [c for c in range(-(-len(paths) // CHUNK)) if c not in done]
    todo = sum(min(CHUNK, len(paths) - c * CHUNK) for c in chunks)
    if not todo:
        return
    bar = Progress(todo, f"caching images at {base} px", unit="img")
    try:
        for c in chunks:
            if stop is not None:
                stop.exit_if_requested(f"while caching images: {len(done)} of {math.ceil(len(paths) / CHUNK)} "
                                       f"chunks are cached in {partial}, the same command continues from there")
            start = c * CHUNK
            bad = []
            part = paths[start:start + CHUNK]
            for i, (pixels, why) in enumerate(pool.map(lambda p: decode_or_reason(p, base), part)):
                if why is not None:
                    if strict:
                        raise UserError(f"{part[i]}: {why} (--strict; without it such files are skipped)")
                    bad.append([start + i, why])
                else:
                    images[start + i] = pixels
            images.flush()  # msync: the chunk is on disk before progress.json says so
            done[c] = bad
            save_progress(partial, fields, base, done, len(paths))
            bar.update(len(part))
    finally:
        bar.close()
