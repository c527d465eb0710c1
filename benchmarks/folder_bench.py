"""Image folders against CIFAR-10's tensors and a plain ImageFolder DataLoader, side by side in one run.

    python benchmarks/folder_bench.py --out results/folder-bench.md       # 2,000 JPEGs at 256 px, ~5 min
    python benchmarks/folder_bench.py --images 64 --image-size 32 --steps 1   # the plumbing (tests)

It writes --images JPEGs of 256 x 256 px (CIFAR-10 test images, upsampled, quality 90) into ten
class folders in a temporary folder, then measures on this machine, in this order:

1. the caching pass (folders.load: decode, resize to the base size, write the uint8 cache), img/s;
2. the median of three epochs of a plain ``ImageFolder`` + ``DataLoader(num_workers=2)`` with the seed's transforms
   (Resize, flip, RandomResizedCrop, ToTensor, Normalize) at --image-size, img/s;
3. the median of three epochs of the data path from the cache (data.TensorLoader on the memory-mapped rows: the
   same flip + crop + resize as CIFAR-10's, from the base size, by torch's uint8 kernels), the same
   by the two matmuls CIFAR-10's 32 px take (kernels=False), and the loader on CIFAR-10's tensors, img/s;
4. training (sample_resnet, --steps steps of batch 32, forward + backward + SGD) fed by each of the
   two tensor loaders, alternated step by step, img/s.

The goals of issue 39: (3) at least 5x (2); (1) no slower than (2); (4) within 10%.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import folders  # noqa: E402
from models import build_model  # noqa: E402
from utils import cpu_name, tune_cpu_allocator  # noqa: E402

BATCH = 128  # the data paths' batch (train.py's default)
TRAIN_BATCH = 32  # training steps: small enough for a CPU
EPOCHS = 3  # the epoch rows: the median of this many epochs (a few seconds each)
JPEG_SIDE = 256


def write_jpegs(images, labels, folder):
    for i, (image, label) in enumerate(zip(images, labels)):
        path = os.path.join(folder, "train", data.CLASSES[label], f"{i:05d}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(image).resize((JPEG_SIDE, JPEG_SIDE), Image.BILINEAR).save(path, quality=90)


def rate(n, seconds):
    return n / max(seconds, 1e-9)


def caching_pass(folder, cache, image_size):
    started = time.perf_counter()
    found = folders.load(folder, image_size, cache, log=lambda m: None)
    return found, time.perf_counter() - started


def plain_epoch(folder, image_size, batch):
    """The seed's way: torchvision's ImageFolder, PIL transforms in two DataLoader workers."""
    import torchvision
    dataset = torchvision.datasets.ImageFolder(os.path.join(folder, "train"), data.seed_train_transform(image_size))
    loader = torch.utils.data.DataLoader(dataset, batch, shuffle=True, num_workers=2, drop_last=True)
    return median_epoch(loader)


def median_epoch(loader, epochs=EPOCHS):
    """(images, seconds) of the median of ``epochs`` epochs: one short epoch is at the mercy of
    whatever else the machine does for a moment."""
    timed = []
    for epoch in range(epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        started, n = time.perf_counter(), 0
        for x, _ in loader:
            n += len(x)
        timed.append(time.perf_counter() - started)
    return n, sorted(timed)[len(timed) // 2]


def training(loaders, steps):
    """img/s of sample_resnet training fed by each loader; steps alternate between them."""
    torch.manual_seed(0)
    model, _ = build_model("sample_resnet", num_classes=10)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    iters = {name: iter(loader) for name, loader in loaders.items()}
    seconds = {name: 0.0 for name in loaders}
    for step in range(steps + 1):  # the first step of each warms up, not timed
        for name in loaders:
            started = time.perf_counter()
            x, y = next(iters[name])
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step:
                seconds[name] += time.perf_counter() - started
    return {name: rate(steps * TRAIN_BATCH, s) for name, s in seconds.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_ROOT", "cifar"))
    p.add_argument("--images", type=int, default=2000, help="JPEGs to write and read")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5, help="timed training steps per loader")
    p.add_argument("--out", help="also write the table to this Markdown file")
    args = p.parse_args(argv)
    tune_cpu_allocator()
    torch.manual_seed(0)
    train_x, train_y, test_x, test_y = data.load_cifar10(args.data_dir, download=False)
    n = args.images
    work = tempfile.mkdtemp(prefix="folder-bench-")
    try:
        folder = os.path.join(work, "jpegs")
        write_jpegs(test_x[:n], test_y[:n], folder)
        mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs) / 1e6
        found, cache_s = caching_pass(folder, os.path.join(work, "cache"), args.image_size)
        batch = min(BATCH, n)
        plain_n, plain_s = plain_epoch(folder, args.image_size, batch)
        rows, labels = found.splits["train"]
        cached = data.TensorLoader(rows, labels, batch, args.image_size, True, "cpu", channels_last=True)
        cifar = data.TensorLoader(train_x[:n], train_y[:n], batch, args.image_size, True, "cpu", channels_last=True)
        cached_n, cached_s = median_epoch(cached)
        matmul_n, matmul_s = median_epoch(data.TensorLoader(rows, labels, batch, args.image_size, True, "cpu",
                                                            channels_last=True, kernels=False))
        cifar_n, cifar_s = median_epoch(cifar)
        train = training({"folder": data.TensorLoader(rows, labels, TRAIN_BATCH, args.image_size, True, "cpu",
                                                      channels_last=True),
                          "cifar": data.TensorLoader(train_x[:n], train_y[:n], TRAIN_BATCH, args.image_size, True,
                                                     "cpu", channels_last=True)}, args.steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    caching, plain = rate(n, cache_s), rate(plain_n, plain_s)
    from_cache, from_cifar = rate(cached_n, cached_s), rate(cifar_n, cifar_s)
    by_matmul = rate(matmul_n, matmul_s)
    path = "uint8 kernels" if cached.kernels else "matmuls"
    lines = [
        f"# Image folders: caching and data path, {n:,} JPEGs of {JPEG_SIDE} px ({mb:.0f} MB), {args.image_size} px",
        "",
        f"Machine: {cpu_name()}, {len(os.sched_getaffinity(0))} usable cores; torch {torch.__version__}; "
        f"base size of the cache {found.base} px.",
        "",
        "| what | img/s | ratio | goal |",
        "|---|---:|---:|---|",
        f"| 1. caching pass (decode, resize to {found.base} px, write uint8) | {caching:,.0f} | "
        f"{caching / plain:.2f}x the plain epoch | >= 1x |",
        f"| 2. plain ImageFolder + DataLoader(num_workers=2), seed's transforms, an epoch | {plain:,.0f} | 1.00x | |",
        f"| 3a. data path from the cache (TensorLoader, flip + crop + resize by {path}), an epoch | "
        f"{from_cache:,.0f} | {from_cache / plain:.1f}x the plain epoch | >= 5x |",
        f"| 3b. the same by the two matmuls (kernels=False), an epoch | {by_matmul:,.0f} | "
        f"{by_matmul / plain:.1f}x the plain epoch | |",
        f"| 3c. the same data path from CIFAR-10's 32 px tensors | {from_cifar:,.0f} | "
        f"{from_cifar / plain:.1f}x the plain epoch | |",
        f"| 4a. training sample_resnet (batch {TRAIN_BATCH}) from the cache | {train['folder']:,.1f} | "
        f"{train['folder'] / train['cifar']:.3f}x CIFAR-10's | >= 0.9x |",
        f"| 4b. training sample_resnet (batch {TRAIN_BATCH}) from CIFAR-10's tensors | {train['cifar']:,.1f} | 1.000x | |",
        "",
        f"Training steps alternate between the two loaders ({args.steps} timed each, after one untimed), so "
        f"both share the machine's state; the data paths and the caching pass run one after another. "
        f"Epoch rows (2, 3a-c): the median of {EPOCHS} epochs.",
    ]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
