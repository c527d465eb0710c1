"""Image folders for the tests: a small three-class folder of mixed sizes and modes, and the bad
files a user's folder holds (written by ``write_bad_files``)."""
import os

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog", "fox")  # sorted: their labels are 0, 1, 2
MODES = ("RGB", "L", "P", "RGBA", "I;16", "CMYK")


def picture(label, rng, size):
    """An RGB image whose dominant channel is its class: learnable in a few steps."""
    w, h = size
    pixels = rng.integers(0, 90, (h, w, 3))
    pixels[..., label] += 150
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def save(img, path, mode):
    """``img`` saved at ``path`` in ``mode`` (the extension chooses the format)."""
    if mode == "I;16":  # 16-bit grayscale PNG: values up to 65535
        values = np.asarray(img.convert("L"), dtype=np.uint16) * 257
        img = Image.fromarray(values)
    elif mode == "P":
        img = img.convert("P", palette=Image.ADAPTIVE)
    elif mode != "RGB":
        img = img.convert(mode)
    img.save(path)


def write_folder(root, per_class=20, splits=("train",), seed=0, size_range=(20, 90)):
    """root/<split>/<class>/<n>.<ext>: mixed sizes (non-square too) and modes. -> the files written."""
    rng = np.random.default_rng(seed)
    written = []
    for split in splits:
        for label, name in enumerate(CLASSES):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                mode = MODES[i % len(MODES)]
                ext = "jpg" if mode in ("RGB", "CMYK") else "png"
                size = tuple(int(v) for v in rng.integers(*size_range, 2))
                path = os.path.join(folder, f"{i:03d}.{ext}")
                save(picture(label, rng, size), path, mode)
                written.append(path)
    return written


def write_bad_files(folder):
    """One of each kind of bad file into ``folder`` -> {kind: path}."""
    os.makedirs(folder, exist_ok=True)
    paths = {}

    def path(kind, ext):
        paths[kind] = os.path.join(folder, f"bad-{kind}.{ext}")
        return paths[kind]

    good = picture(0, np.random.default_rng(1), (64, 64))
    good.save(path("truncated", "jpg"))
    with open(paths["truncated"], "rb") as f:
        whole = f.read()
    with open(paths["truncated"], "wb") as f:
        f.write(whole[:len(whole) // 2])
    open(path("empty", "jpg"), "wb").close()
    with open(path("text", "jpg"), "w") as f:
        f.write("not an image\n")
    Image.new("RGB", (1, 1)).save(path("one-pixel", "png"))
    Image.new("1", (20000, 20000)).save(path("bomb", "png"))  # 400 MP: over twice PIL's limit, 50 KB on disk
    with open(path("corrupt", "jpg"), "wb") as f:  # a JPEG's first bytes, then noise
        f.write(whole[:20] + np.random.default_rng(2).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    return paths
