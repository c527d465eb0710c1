"""Write CIFAR-10 as an image folder of PNGs: the way to try the folder path without images of your own.

    python tools/cifar_to_folder.py --data-dir $CIFAR10_ROOT --out ~/cifar10-png
    python train.py --model sample_resnet --image-size 32 --data-dir ~/cifar10-png   # = the run from the binary files

It writes OUT/train/<class>/<index>.png (50,000) and OUT/test/<class>/<index>.png (10,000), the
index zero-padded in CIFAR-10's own order. PNG is lossless and the folder reader orders images by
their name within the class folder, so the folder holds CIFAR-10's uint8 arrays in CIFAR-10's
order: a run from it at 32 px equals the run from the binary files bit for bit (tests/test_folders.py).
About 140 MB and half a minute on two cores. The folder is written as OUT.partial and renamed to
OUT when whole.
"""
import argparse
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from report import Progress  # noqa: E402
from utils import Parser, UserError, positive, run_cli  # noqa: E402


def write_split(images, labels, folder, bar):
    for name in data.CLASSES:
        os.makedirs(os.path.join(folder, name), exist_ok=True)
    width = len(str(len(labels) - 1))

    def write(i):
        # compress_level 1: 4x faster to write than the default, a few % larger; lossless either way
        path = os.path.join(folder, data.CLASSES[labels[i]], f"{i:0{width}d}.png")
        Image.fromarray(images[i]).save(path, compress_level=1)

    with ThreadPoolExecutor(2) as pool:  # PIL releases the GIL while it encodes
        for _ in pool.map(write, range(len(labels)), chunksize=256):
            bar.update(1)


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_ROOT", "cifar"),
                   help="CIFAR-10 (cifar-10-batches-bin or -py inside; default: $CIFAR10_ROOT or cifar)")
    p.add_argument("--out", required=True, help="the image folder to write (must not exist)")
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--limit", type=positive(int), metavar="N",
                   help="only the first N images of each split (a quick look; a run from it is not the binary run)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if os.path.exists(args.out):
        raise UserError(f"--out {args.out} exists; pass a new folder", exit_code=2)
    train_x, train_y, test_x, test_y = data.load_cifar10(args.data_dir, download=not args.no_download)
    partial = args.out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    splits = {"train": (train_x[:args.limit], train_y[:args.limit]), "test": (test_x[:args.limit], test_y[:args.limit])}
    bar = Progress(sum(len(y) for _, y in splits.values()), "writing PNGs", unit="img")
    try:
        for name, (x, y) in splits.items():
            write_split(x, y, os.path.join(partial, name), bar)
    finally:
        bar.close()
    os.replace(partial, args.out)
    print(f"wrote {args.out}: " + ", ".join(f"{name}/ {len(y):,} images" for name, (_, y) in splits.items())
          + f" of {len(data.CLASSES)} classes")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
