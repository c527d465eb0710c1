"""What a checkpoint costs an epoch: the old synchronous save against checkpoints.CheckpointWriter.

    python benchmarks/checkpoint_bench.py                      # resnet_att_scratch + SGD state, ~1 min
    python benchmarks/checkpoint_bench.py --model sample_resnet --epochs 2 --steps 2   # tests

Side by side in one run, on the same files: a few "epochs" of real training steps (sample_resnet
at 32 px: the compute the write overlaps with), each followed by saving the checkpoint of
``--model`` (last.pth and the best, as train.py does when a validation improves). Reported: the
wall time per epoch with no save, with the synchronous save (atomic_save, fsync, rename: what
train.py did), and with the background writer (only the copy to host memory waits), and each
save's blocking time.
"""
import argparse
import contextlib
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import checkpoints  # noqa: E402
import data  # noqa: E402
import engine  # noqa: E402
from models import build_model  # noqa: E402


def checkpoint_state(name):
    """A checkpoint of ``name`` as train.py writes it, with a full SGD momentum buffer."""
    model, cfg = build_model(name, weights="none")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = engine.make_optimizer("sgd", 0.01, 5e-4, params)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    return model, {"model": cfg, "state_dict": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1}


def run(mode, epochs, steps, state, folder):
    """Wall seconds per epoch, and the seconds each save blocked the training thread."""
    torch.manual_seed(0)
    net, _ = build_model("sample_resnet")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (steps * 64, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, steps * 64)
    loader = data.TensorLoader(x, y, 64, 32, True, "cpu")
    opt = engine.make_optimizer("sgd", 0.01, 5e-4, net.parameters())
    sched = engine.make_scheduler(opt, len(loader), epochs)
    meter, writer, blocked = engine.Meter(torch.device("cpu")), checkpoints.CheckpointWriter(), []
    start = time.time()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for xb, yb in loader:
            engine.train_step(net, xb, yb, nn.CrossEntropyLoss(), opt, sched, contextlib.nullcontext(), meter)
        t = time.time()
        if mode == "sync":
            checkpoints.save_checkpoint(state, True, folder, "best.pth")
        elif mode == "background":
            writer.save(state, True, folder, "best.pth")
        blocked.append(time.time() - t)
    writer.wait()
    return (time.time() - start) / epochs, blocked


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet_att_scratch", help="whose checkpoint is saved")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=40, help="training steps per epoch (sample_resnet, 32 px, batch 64)")
    args = p.parse_args(argv)
    _, state = checkpoint_state(args.model)
    with tempfile.TemporaryDirectory(dir=ROOT) as folder:
        run("none", 1, args.steps, state, folder)  # warm-up: first-touch allocations, kernels
        results = {mode: run(mode, args.epochs, args.steps, state, folder) for mode in ("none", "sync", "background")}
        size = os.path.getsize(os.path.join(folder, "last.pth"))
    base = results["none"][0]
    print(f"checkpoint of {args.model}: {size / 1e6:.0f} MB, written twice per epoch (last.pth and the best); "
          f"{args.epochs} epochs of {args.steps} steps; {os.cpu_count()} CPUs, torch {torch.__version__}\n")
    print("| save | s / epoch | save cost / epoch | blocked per save (median) |")
    print("|---|---:|---:|---:|")
    for mode, (per_epoch, blocked) in results.items():
        print(f"| {mode} | {per_epoch:.2f} | {per_epoch - base:+.2f} s ({(per_epoch - base) / base:+.0%}) | "
              f"{np.median(blocked):.3f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
