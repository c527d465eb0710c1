"""Evaluate a checkpoint on its test set (CIFAR-10's, or an image folder's test/), or classify image files with it.

    python evaluate.py checkpoints/<run>/ResNet_att.pth                # test loss, accuracy, per class
    python evaluate.py checkpoints/<run>/ResNet_att.pth --images a.png b.jpg   # top-3 per image
    python evaluate.py checkpoints/<run>/ResNet_att.onnx               # the same test through ONNX Runtime

CHECKPOINT may be a train.py checkpoint, a release file or an ONNX file of export.py: one
evaluation path for all three (the same images, the same preprocessing), so their test accuracy
and images/s can be set side by side.

Beside the checkpoint (or where the options say) it writes the confusion matrix, the reliability
diagram (calibration: accuracy against confidence in 15 bins, and the expected calibration error)
and the per-image test predictions, <name>-test.npz, which compare.py reads for its paired tests.

The model is rebuilt from the checkpoint alone (its name, layout and image size are recorded in it).
From Python: ``model, info = checkpoints.load_model(path)`` (docs/evaluate.md).
"""
import argparse
import os
import sys
import time

import torch

import checkpoints
import data
import deploy
from data import load_image  # noqa: F401 -- evaluate.load_image: the reader of --images
import engine
import report
import stats
from utils import Parser, UserError, positive, run_cli, setup_runtime, tune_cpu_allocator


def parse_args(argv):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
        "see also: explain.py CHECKPOINT --out maps.png   Grad-CAM and CBAM attention maps per image\n"
        "          compare.py log/<run>.csv ... --out runs.png   runs' curves and results table side by side"))
    p.add_argument("checkpoint")
    p.add_argument("--data-dir", help="the test set: CIFAR-10 ($CIFAR10_ROOT or cifar) for a CIFAR-10 checkpoint, "
                                      "else the image folder it was trained on (its run's --data-dir)")
    p.add_argument("--cache-dir", help="an image folder's decoded images (default: its run's --cache-dir)")
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--batch-size", type=positive(int), default=256)
    p.add_argument("--test-subset", type=positive(int), help="default: the checkpoint run's own")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--confusion", metavar="PNG", help="default: next to the checkpoint, <name>-confusion.png")
    p.add_argument("--reliability", metavar="PNG", help="default: next to the checkpoint, <name>-reliability.png")
    p.add_argument("--predictions", metavar="NPZ", help="per-image test probabilities (compare.py reads them); "
                                                         "default: next to the checkpoint, <name>-test.npz")
    p.add_argument("--images", nargs="+", metavar="FILE", help="print the top-3 classes of each image file")
    return p.parse_args(argv)


def predict(model, paths, info, rt):
    """Top-3 classes per image, each resized as in evaluation (Resize(shorter side), ToTensor,
    Normalize); one image at a time, since files of other shapes give other tensor shapes."""
    images = [info["transform"](load_image(p)) for p in paths]  # read them all first: fail before any output
    classes = info["classes"]
    for path, x in zip(paths, images):
        with torch.inference_mode(), rt.autocast:
            p = model(x[None].to(rt.device)).float().softmax(dim=1)[0].cpu()
        top = p.topk(3)
        print(f"{path}: " + ", ".join(f"{classes[i]} {v:.3f}" for v, i in zip(top.values.tolist(), top.indices.tolist())))


def test_loader(args, info, device, dataset=None):
    """The run's own test split (its seed, validation split and test subset; --test-subset overrides)."""
    dataset = dataset or data.open_test_set(info, args.checkpoint, args.data_dir, args.cache_dir, not args.no_download)
    run = info["args"]
    test = data.get_splits(dataset, run["val_split"], None, test_subset(args, info), data.split_seed(run))["test"]
    return data.TensorLoader(*test, args.batch_size, info["image_size"], train=False, device=device)


def test_subset(args, info):
    return args.test_subset or info["args"].get("test_subset")


def main(argv=None):
    tune_cpu_allocator()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.predictions and not args.predictions.endswith(".npz"):
        raise UserError(f"--predictions {args.predictions}: the predictions are a NumPy .npz file, name it *.npz",
                        exit_code=2)
    if args.test_subset and args.test_subset > 10000 and not data.is_folder(args.data_dir or ""):  # before any loading
        raise UserError(f"--test-subset {args.test_subset} is larger than the 10,000 test images", exit_code=2)
    onnx = args.checkpoint.lower().endswith(".onnx")
    rt = setup_runtime("cpu" if onnx else args.device, distributed=False)  # ONNX Runtime: its CPU provider
    model, info = deploy.load_onnx(args.checkpoint) if onnx else checkpoints.load_model(args.checkpoint, rt.device)

    if args.images:
        predict(model, args.images, info, rt)
        return 0

    classes, image_size = info["classes"], info["image_size"]
    dataset = data.open_test_set(info, args.checkpoint, args.data_dir, args.cache_dir, not args.no_download)
    loader = test_loader(args, info, rt.device, dataset)
    progress = report.Progress(len(loader.labels), "testing", every_s=30.0)
    started = time.perf_counter()
    try:
        loss, acc, confusion, (probs, predicted, labels) = engine.evaluate(
            model, loader, rt.device, rt.autocast, len(classes), keep_predictions=True, progress=progress.update)
    finally:
        progress.close()
    seconds = time.perf_counter() - started
    print(f"{info['name']} ({args.checkpoint}), epoch {info['epoch']}, "
          f"{confusion.sum().item()} test images at {image_size} px")
    print(f"Test loss : {loss:.4f}")
    print(f"Test Acc : {acc:.4f}")
    print(f"Test images/s : {len(labels) / seconds:.1f} ({'ONNX Runtime' if onnx else 'PyTorch'} on {rt.device}, "
          f"{rt.precision}, batch {args.batch_size}, resizing included)")
    print(f"{'class':<12}{'correct':>8}{'total':>8}{'accuracy':>10}")
    for i, name in enumerate(classes):
        total = confusion[i].sum().item()
        print(f"{name:<12}{confusion[i, i].item():>8}{total:>8}{confusion[i, i].item() / max(total, 1):>10.4f}")
    base = os.path.splitext(args.checkpoint)[0]
    what = f"{report.checkpoint_label(args.checkpoint)} ({info['name']}, epoch {info['epoch']})"
    cal = stats.calibration(probs.float().numpy(), labels.numpy(), predicted.numpy())
    print(f"Calibration: ECE {cal.ece:.4f} ({len(cal.count)} bins), mean confidence "
          f"{probs.float().max(1).values.mean().item():.4f}")
    png = args.confusion or base + "-confusion.png"
    report.plot_confusion(confusion.numpy(), classes, png, report.confusion_title(what, acc, confusion))
    print(f"confusion matrix: {png}")
    png = args.reliability or base + "-reliability.png"
    report.plot_reliability(cal, png, report.calibration_title(what, cal))
    print(f"reliability diagram: {png}")
    npz = args.predictions or base + "-test.npz"
    run = info["args"]
    report.save_predictions(npz, probs, labels, data.test_indices(test_subset(args, info), data.split_seed(run),
                                                                  data.test_count(dataset)),
                            report.predictions_meta(dataset.name, classes, run, info["run_name"],
                                                    report.checkpoint_label(args.checkpoint), info["epoch"], loss, acc),
                            predicted)
    print(f"test predictions: {npz}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
