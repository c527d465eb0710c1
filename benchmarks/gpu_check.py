"""Issue 6 in one script for a GPU machine, within about 8 minutes: versions, bench.py --device cuda,
then training from random weights on the real data that fits one call (data_batch_1.bin +
test_batch.bin: 10,000 training and 10,000 test images), as many epochs as fit the time left.

    # stage the two files in an ignored folder (61.5 MB, under one call's 64 MiB), carry it:
    mkdir -p cifar/cifar-10-batches-bin
    cp ../shared/data/cifar-10-batches-bin/{data_batch_1,test_batch}.bin cifar/cifar-10-batches-bin/
    python benchmarks/gpu_check.py --data-dir cifar                  # everything lands under $OUT
    # a rehearsal on the CPU, in a minute or two:
    python benchmarks/gpu_check.py --device cpu --image-size 32 --train-subset 512 --test-subset 256 \\
        --epochs 1 --bench-args="--batch-size 16 --steps 1 --min-seconds 0.2 --models sample_resnet"

The folder holds only one of the five training batches, so train.py runs with CIFAR10_PARTIAL=1
(data.py then reads the batches that are there and says so). Without --epochs, each model gets the
epochs its measured bench throughput fits in its share of the time left. With --weights PATH (the
ImageNet ResNet-50, staged in an earlier call) resnet and resnet_att train too, from those weights.
Written under --out (a device call brings back at most 8 files): gpu-<date>-<gpu>.md and .json (the
throughput and accuracy tables, versions, settings, commands; rewritten after every model) and
logs.tar.gz (versions.json, bench.json/.log, each run's .out/.log/.csv/.png). Checkpoints are
deleted. On the device:  python3 benchmarks/gpu_check.py --data-dir cifar 2>&1 | tee $OUT/console.log
"""
import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import reproduce  # noqa: E402
from bench import machine_info, machine_line  # noqa: E402

BUDGET_S = 480  # the whole script: a 10-minute call keeps room for start-up and copying back
BENCH_SHARE = 0.45  # of the budget at most for bench.py (~2 min expected); training gets the rest
SCRATCH_MODELS = ["sample_resnet", "resnet_scratch", "resnet_att_scratch"]  # from random weights
PRETRAINED_MODELS = ["resnet", "resnet_att"]  # only with --weights (the file must be staged first)
TRAIN_POOL = 10_000  # data_batch_1.bin
VAL_SPLIT = 1000  # class-balanced hold-out of those: 9,000 train, 1,000 validation
FALLBACK_EPOCHS = 5  # when bench.py measured nothing for a model (the deadline still applies)
RUN_OVERHEAD_S = 30  # per train.py run: start-up, data, cuDNN autotuning, validation, test at 224 px
SAFETY = 0.7  # of bench's step throughput (batch 256) for train.py's epochs (batch 128, logging)
MAX_EPOCHS = 30


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_ROOT", "cifar"))
    p.add_argument("--weights", help="ImageNet ResNet-50 file: also train resnet and resnet_att from it")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "results", time.strftime("gpu-check-%Y%m%d-%H%M%S")),
                   help="default: $OUT if set, else results/gpu-check-<time>")
    p.add_argument("--epochs", type=int, help="per model (default: as many as fit the budget)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole script")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, help="train.py's (default: its own, 128)")
    p.add_argument("--val-split", type=int, default=VAL_SPLIT, help="validation images held out of the 10,000")
    p.add_argument("--train-subset", type=int, help="default: all that the validation split leaves")
    p.add_argument("--test-subset", type=int, help="default: all 10,000")
    p.add_argument("--compile", action="store_true", help="bench.py and train.py with torch.compile")
    p.add_argument("--bench-args", default="", help="extra bench.py options, one string")
    p.add_argument("--skip-bench", action="store_true")
    return p.parse_args(argv)


def versions(device):
    """GPU, driver, CUDA, cuDNN, torch: what the figures depend on."""
    info = machine_info()
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        smi = None
    info.update(nvidia_smi=smi, torchvision=__import__("torchvision").__version__, device=device)
    return info


def run_logged(cmd, log_path, timeout):
    """A command's output to the console and ``log_path``; killed after ``timeout`` seconds."""
    print("$ " + shlex.join(cmd), flush=True)
    with open(log_path, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    with open(log_path) as f:
        print(f.read(), flush=True)
    return rc


def bench(args, work, timeout):
    path = os.path.join(work, "bench.json")
    cmd = [sys.executable, os.path.join(HERE, "bench.py"), "--device", args.device, "--json", path]
    if args.image_size != 224:
        cmd += ["--image-size", str(args.image_size)]
    cmd += (["--compile"] if args.compile else []) + shlex.split(args.bench_args)
    rc = run_logged(cmd, os.path.join(work, "bench.log"), timeout)
    if not os.path.exists(path):  # bench.py writes it after every model: even a timeout leaves rows
        print(f"gpu_check: bench.py ended with {rc} and no rows", flush=True)
        return None
    with open(path) as f:
        result = json.load(f)
    if rc != 0:
        result["markdown"] = f"**bench.py ended with {rc}: the rows it finished.**\n\n" + result["markdown"]
    return result


def epochs_that_fit(model, bench_result, seconds, n_train):
    """Epochs of ``n_train`` images at the bench's training throughput that fit ``seconds``."""
    rates = {r["model"]: r["project_img_s"] for r in (bench_result or {}).get("rows", [])
             if r["kind"] == "train" and "error" not in r}
    if model not in rates:
        return FALLBACK_EPOCHS
    return max(1, min(MAX_EPOCHS, math.floor((seconds - RUN_OVERHEAD_S) * SAFETY * rates[model] / n_train)))


def model_options(model, args):
    opts = {"image_size": args.image_size, "val_split": args.val_split, "val_every": 5,
            "batch_size": args.batch_size, "train_subset": args.train_subset,
            "test_subset": args.test_subset, "compile": args.compile,
            "weights": args.weights if model in PRETRAINED_MODELS else "none"}
    return {k: v for k, v in opts.items() if v is not None and v is not False}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    start = time.time()
    deadline = start + args.budget
    work = os.path.join(args.out, "logs")  # packed into logs.tar.gz at the end: few files come back
    os.makedirs(work, exist_ok=True)

    info = versions(args.device)
    print(f"gpu_check: {machine_line(info)}; nvidia-smi: {info['nvidia_smi']}; CUDA {info['cuda']}, "
          f"cuDNN {info['cudnn']}, torchvision {info['torchvision']}", flush=True)
    with open(os.path.join(work, "versions.json"), "w") as f:
        json.dump(info, f, indent=2)
    meta = {"preset": "gpu", "command": "python benchmarks/gpu_check.py " + shlex.join(argv), "machine": info,
            "weights": f"none (random); {args.weights} for resnet, resnet_att" if args.weights else "none (random)",
            "train_pool": TRAIN_POOL, "date": time.strftime("%Y-%m-%d %H:%M"),
            "data": f"data_batch_1.bin (10,000 training images, {args.val_split:,} held out for validation) "
                    f"+ test_batch.bin"}

    meta["bench"] = None if args.skip_bench else bench(args, work, args.budget * BENCH_SHARE)

    models = SCRATCH_MODELS + (PRETRAINED_MODELS if args.weights else [])
    n_train = args.train_subset or TRAIN_POOL - args.val_split
    checkpoints = tempfile.mkdtemp(prefix="gpu-check-ckpt-")  # hundreds of MB: they do not come back
    common = {"data_dir": args.data_dir, "device": args.device, "log_dir": work, "out": checkpoints}
    rows = []
    for i, model in enumerate(models):
        share = (deadline - time.time()) / (len(models) - i)
        opts = model_options(model, args)
        opts["epochs"] = args.epochs or epochs_that_fit(model, meta["bench"], share, n_train)
        print(f"gpu_check: {model}: {reproduce.describe(opts, TRAIN_POOL)} (share {share:.0f} s)", flush=True)
        rows.append(reproduce.run_model(model, opts, common, {"tag": "gpu", "log": work},
                                        time.strftime("%Y%m%d-%H%M%S"), deadline=deadline,
                                        env={"CIFAR10_PARTIAL": "1"}))
        meta["total_wall_s"] = round(time.time() - start, 1)
        path = write_report(rows, meta, args.out)  # after every model: a cut-off run still reports
    shutil.rmtree(checkpoints, ignore_errors=True)
    pack(work, os.path.join(args.out, "logs.tar.gz"))
    print("\n" + open(path).read())
    print(f"gpu_check: {meta['total_wall_s']:.0f} s in all; written: {path} (and .json), "
          f"{args.out}/logs.tar.gz (bench and every run's log, CSV and curves)")
    return 1 if any(r["returncode"] for r in rows) else 0


def write_report(rows, meta, out_dir):
    base = reproduce.output_base(out_dir, "gpu", meta["machine"])
    m = meta["machine"]
    bench_md = meta["bench"]["markdown"] if meta["bench"] else "(bench.py did not finish: see bench.log)\n"
    text = (reproduce.markdown(rows, meta) +
            f"\nVersions: nvidia-smi `{m['nvidia_smi']}`, CUDA {m['cuda']}, cuDNN {m['cudnn']}, torch {m['torch']}, "
            f"torchvision {m['torchvision']}, Python {m['python']}. Training data: {meta['data']} "
            f"(CIFAR10_PARTIAL=1). Whole script: {meta['total_wall_s']:.0f} s.\n"
            "\n## Throughput: bench.py\n\n" +
            (f"Command: `{meta['bench']['command']}`\n\n" if meta["bench"] else "") + bench_md)
    with open(base + ".md", "w") as f:
        f.write(text)
    with open(base + ".json", "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=2)
    return base + ".md"


def pack(folder, archive):
    """One archive instead of a dozen files (a device call returns at most 8)."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=os.path.basename(folder))
    shutil.rmtree(folder)


if __name__ == "__main__":
    sys.exit(main())
