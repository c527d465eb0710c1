"""A trained model for use elsewhere: a weights-only release file, ONNX, or a torch.export program.

    python export.py checkpoints/<run>/ResNet_att.pth                      # <name>-release.pth (float32)
    python export.py checkpoints/<run>/ResNet_att.pth --dtype float16      # half the size
    python export.py checkpoints/<run>/ResNet_att.pth --format onnx --check        # <name>.onnx, checked by ONNX Runtime
    python export.py checkpoints/<run>/ResNet_att.pth --format torch-export --check  # <name>.pt2

release       the network's weights and what rebuilds and feeds it (model, image size, mean, std,
              class names, the run's test accuracy when its log/<run>-test.npz is found), no
              optimiser: it cannot resume. checkpoints.load_model, evaluate.py and explain.py read
              it as they read a checkpoint.
onnx          the network as an ONNX graph with a dynamic batch; input "input": the normalised
              float32 batch (N, 3, S, S) the PyTorch network takes; output "logits". Its metadata
              holds S, mean, std, the class names. evaluate.py tests it through ONNX Runtime.
torch-export  torch.export's ExportedProgram (.pt2), dynamic batch, the same metadata.

--check runs the exported file on a batch and compares its logits with PyTorch's: the largest
difference is printed, and above deploy.TOLERANCE the file is removed and the command fails.
A release file is always checked (its weights load back exactly, float32 bit for bit).
Every file is written atomically: a failed export leaves no partial file.
"""
import argparse
import os
import sys

import torch

import checkpoints
import deploy
import report
from utils import Parser, UserError, run_cli, versions

FORMATS = {"release": "-release.pth", "onnx": ".onnx", "torch-export": ".pt2"}
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def parse_args(argv):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint of train.py (last.pth or the best), or a release file")
    p.add_argument("--format", choices=list(FORMATS), default="release")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the release file's weights")
    p.add_argument("--out", help="the file to write (default: beside the checkpoint, <name>" + "|".join(FORMATS.values())
                                 + ")")
    p.add_argument("--check", action="store_true", help="compare the exported file's logits with PyTorch's")
    args = p.parse_args(argv)
    if args.dtype != "float32" and args.format != "release":
        raise UserError(f"--dtype {args.dtype}: only the release file is stored in float16; ONNX and "
                        f"torch.export are float32", exit_code=2)
    args.out = args.out or os.path.splitext(args.checkpoint)[0] + FORMATS[args.format]
    if os.path.abspath(args.out) == os.path.abspath(args.checkpoint):
        raise UserError(f"--out {args.out} is the checkpoint itself", exit_code=2)
    return args


def test_accuracy(path, ckpt):
    """The test accuracy train.py printed for this checkpoint, from its predictions file
    log/<run>-test.npz (train.py --log-dir, relative to where it ran: tried from here and from
    the folder above the checkpoints'); None when not found or of another checkpoint."""
    log_dir = str(ckpt["args"].get("log_dir") or "log")
    above = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    for base in ([""] if os.path.isabs(log_dir) else [os.getcwd(), above]):
        npz = report.predictions_path(os.path.join(base, log_dir, ckpt["run_name"]))
        if os.path.isfile(npz):
            try:
                meta = report.read_predictions(npz)["meta"]
            except UserError:
                continue
            if meta.get("epoch") == ckpt["epoch"] and meta.get("checkpoint") == os.path.basename(path):
                return meta.get("test_acc")
    return None


def export_release(args):
    ckpt = checkpoints.safe_load(args.checkpoint)
    if isinstance(ckpt, dict) and ckpt.get("format") == checkpoints.RELEASE_FORMAT:
        raise UserError(f"{args.checkpoint} is a release file already; export it to onnx or torch-export", exit_code=2)
    ckpt = checkpoints.load_checkpoint(args.checkpoint)
    acc = test_accuracy(args.checkpoint, ckpt)
    state = checkpoints.release_state(ckpt, DTYPES[args.dtype], acc)
    try:
        checkpoints.atomic_save(state, args.out)
    except OSError as e:
        raise UserError(f"could not write {args.out}: {e.strerror or e}; nothing was written") from None
    # the check: the file loads back (load_model) into the checkpoint's network, weights for weights
    original, _ = checkpoints.load_model(args.checkpoint)
    released, info = checkpoints.load_model(args.out)
    x = deploy.example_batch(info, n=4)
    diff = deploy.max_abs_difference(original, released, x)
    if args.dtype == "float32" and diff != 0:
        os.remove(args.out)
        raise UserError(f"the release file's logits differ from the checkpoint's by {diff:.3g}; removed {args.out}")
    print(f"release file: {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB, {args.dtype}, {info['name']}, "
          f"{info['image_size']} px, {len(info['classes'])} classes, test accuracy "
          f"{'unknown (no predictions of this checkpoint found)' if acc is None else f'{acc:.4f}'})")
    print(f"check: logits against the checkpoint's on a batch of 4: max abs difference {diff:.3g}")
    print(f"use it: python evaluate.py {args.out}   or   checkpoints.load_model({args.out!r})")


def export_other(args):
    model, info = checkpoints.load_model(args.checkpoint)
    if args.format == "onnx":
        deploy.export_onnx(model, info, args.out)
        load = lambda: deploy.load_onnx(args.out)[0]
    else:
        deploy.export_program(model, info, args.out)
        load = lambda: deploy.load_program(args.out)[0]
    print(f"{args.format}: {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB, {info['name']}; input "
          f'"{deploy.INPUT}": (N, 3, {info["image_size"]}, {info["image_size"]}) float32, normalised; output '
          f'"{deploy.OUTPUT}": (N, {len(info["classes"])}); torch {versions()["torch"]})')
    if args.check:
        x = deploy.example_batch(info, n=5, seed=1)  # another batch size than the export's: the axis is dynamic
        diff = deploy.max_abs_difference(model, load(), x)
        verdict = "ok" if diff <= deploy.TOLERANCE else "FAILED"
        print(f"check: logits against PyTorch's on a batch of 5: max abs difference {diff:.3g} "
              f"(tolerance {deploy.TOLERANCE:g}): {verdict}")
        if diff > deploy.TOLERANCE:
            os.remove(args.out)
            raise UserError(f"{args.out} computes other logits than the PyTorch network ({diff:.3g}); removed it")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.format == "onnx":
        deploy.require_onnx()  # before any work: say what to install
    if args.format == "release":
        export_release(args)
    else:
        export_other(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
