"""ResNet-50 inference throughput on the CPU, as the feature cache runs it, before and after.

    python benchmarks/extract_bench.py                  # 224 px, ~4 minutes on two cores
    python benchmarks/extract_bench.py --image-size 32 --seconds 1   # the plumbing (tests)

Each row runs in its own process (the allocator setting cannot be undone inside one), side by
side in one run: the old setting (NCHW, batch 256: train.py's evaluation batch, glibc's default
allocator), channels_last alone, and the feature cache's (channels_last, batch
features.EXTRACT_BATCH, utils.tune_cpu_allocator). Per row: images/s, minor page faults per image
and the share of CPU time spent in the kernel, which is where the page faults go.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ROWS = [  # name, memory format, batch, tuned allocator
    ("before: NCHW, batch 256, default allocator", "nchw", 256, False),
    ("channels_last, batch 32, default allocator", "cl", 32, False),
    ("after: channels_last, batch 32, tuned allocator", "cl", 32, True),
]


def measure(fmt, batch, tuned, size, seconds):
    """One row, in this process: images/s, page faults per image, kernel share of CPU time."""
    import torch
    import torchvision
    from utils import tune_cpu_allocator
    if tuned:
        tune_cpu_allocator()
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(batch, 3, size, size)
    if fmt == "cl":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)  # warm-up: first-touch allocations, oneDNN kernels
        n, start, r0 = 0, time.time(), resource.getrusage(resource.RUSAGE_SELF)
        while n == 0 or time.time() - start < seconds:
            model(x)
            n += batch
        wall, r1 = time.time() - start, resource.getrusage(resource.RUSAGE_SELF)
    user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    return {"img_s": n / wall, "images": n, "seconds": wall, "faults_per_img": (r1.ru_minflt - r0.ru_minflt) / n,
            "kernel_share": system / max(user + system, 1e-9)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seconds", type=float, default=30, help="timed seconds per row (after one warm-up batch)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--row", type=int, help=argparse.SUPPRESS)  # internal: measure one row, print JSON
    args = p.parse_args(argv)
    if args.row is not None:
        _, fmt, batch, tuned = ROWS[args.row]
        print(json.dumps(measure(fmt, batch, tuned, args.image_size, args.seconds)))
        return 0
    import torch
    from utils import cpu_name
    rows = []
    for i, (name, *_) in enumerate(ROWS):
        out = subprocess.run([sys.executable, __file__, "--row", str(i), "--image-size", str(args.image_size),
                              "--seconds", str(args.seconds)], capture_output=True, text=True, check=True)
        rows.append({"row": name, **json.loads(out.stdout.strip().splitlines()[-1])})
        print(f"{name}: {rows[-1]['img_s']:.1f} img/s", file=sys.stderr, flush=True)
    machine = f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"ResNet-50 inference at {args.image_size} px, random weights; {machine}\n")
    print("| setting | img/s | page faults / img | kernel share of CPU time | vs before |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['row']} | {r['img_s']:.1f} | {r['faults_per_img']:,.0f} | {r['kernel_share']:.0%} | "
              f"{r['img_s'] / rows[0]['img_s']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "image_size": args.image_size, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
