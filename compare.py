"""Runs side by side: their loss and accuracy curves in one figure, one Markdown table row per run.

    python compare.py log/sample_resnet-20261127-101500.csv log/resnet_att-20261127-103000.csv --out runs.png

A run is train.py's log/<run>.csv, with the log/<run>.log beside it and the checkpoints that log
names. The table (stdout) has, per run: model, train accuracy of the last epoch, best validation
accuracy, test accuracy (the log's `Test Acc`), trainable parameters, epochs, image size, training
images (from the run's arguments in its checkpoint), training wall time (the epochs' `seconds`
summed: training steps only, not data loading, validation or test) and training images/s (a frozen
model trained on cached features, --no-augment: its head's; the backbone ran once, before). What
cannot be known yet (a run still going has no test accuracy; a deleted checkpoint, no arguments)
is printed as "running" or an em dash, and said on stderr.
"""
import argparse
import os
import sys

import checkpoints
import report
from utils import Parser, UserError, read_text, run_cli

MISSING = "\u2014"  # an em dash: not known

def parse_args(argv):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+", metavar="LOG.csv", help="train.py's per-epoch CSV of each run")
    p.add_argument("--out", metavar="PNG", help="the curves figure (default: the table only)")
    args = p.parse_args(argv)
    if args.out and not args.out.lower().endswith(".png"):
        raise UserError(f"--out {args.out}: the figure is a PNG file, name it *.png", exit_code=2)
    return args


def warn(message):
    print(f"{os.path.basename(sys.argv[0])}: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Reading a run


def read_log(path):
    """report.parse_log of the run's .log; {} if absent."""
    return report.parse_log(read_text(path)) if os.path.isfile(path) else {}


def find_checkpoint(log_path, info):
    """The run's last.pth (or its best checkpoint): the log names the folder as train.py was given it,
    relative to where it ran, usually the folder above log/."""
    folder = info.get("ckpt_dir")
    if not folder:
        return None
    above_log = os.path.dirname(os.path.dirname(os.path.abspath(log_path)))
    bases = [""] if os.path.isabs(folder) else [os.getcwd(), above_log]
    for base in bases:
        for name in (checkpoints.LAST, info["best"]):
            path = os.path.join(base, folder, name)
            if os.path.isfile(path):
                return path
    return None


def run_row(csv_path):
    """One run -> (name, table cells, epochs rows); what is missing is said on stderr."""
    rows = report.read_csv(csv_path)
    name = os.path.splitext(os.path.basename(csv_path))[0]
    log_path = os.path.splitext(csv_path)[0] + ".log"
    info = read_log(log_path)
    if not info:
        warn(f"{name}: no log {log_path} (or no run line in it): model, parameters, image size, test "
             f"accuracy and training images are unknown")
    args = {}
    ckpt = find_checkpoint(log_path, info)
    if ckpt:
        try:
            args = checkpoints.load_checkpoint(ckpt)["args"]
        except UserError as e:
            warn(f"{name}: {e}; training images unknown")
    elif info:
        warn(f"{name}: no checkpoint in {info.get('ckpt_dir', '(not named in the log)')}/ (deleted?): "
             f"training images unknown")
    test = info.get("test_acc")
    if info and test is None:
        warn(f"{name}: no 'Test Acc' line in {log_path} yet: still running, or stopped before the test")
    planned = int(info["epochs"]) if "epochs" in info else args.get("epochs")
    figures = report.run_figures(rows, info)
    done = figures["epochs_done"]
    train_images = (args.get("train_subset") or 50000 - args["val_split"]) if "val_split" in args else None
    fmt = lambda v, spec: MISSING if v is None else format(v, spec)
    cells = [
        name, info.get("model", args.get("model", MISSING)),
        fmt(figures["train_acc"], ".4f"),
        fmt(figures["best_val_acc"], ".4f"),
        fmt(test, ".4f") if test is not None else ("running" if info else MISSING),
        fmt(figures["trainable_params"], ","),
        (str(done) if planned in (None, done) else f"{done} of {planned}"),
        info.get("size", str(args["image_size"]) if "image_size" in args else MISSING),
        fmt(train_images, ","),
        duration(figures["train_s"]) if rows else MISSING,
        fmt(figures["train_img_s"], ",.0f") + (" (head, cached features)" if info.get("cached") else ""),
    ]
    return name, cells, rows


def duration(s):
    return f"{s:.1f} s" if s < 60 else report.format_seconds(s)


HEADER = ["run", "model", "train acc (last epoch)", "best val acc", "test acc", "trainable params", "epochs",
          "image size", "train images", "train wall time", "train img/s"]


def table(rows):
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(HEADER) - 2)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


# ----------------------------------------------------------------------------------------------
# The figure


def plot(runs, path):
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, rows) in enumerate(runs):
        color = colors[k % len(colors)]
        for split, style in (("train", "-o"), ("val", "--s")):
            pts = [(r["epoch"], r[f"{split}_loss"], r[f"{split}_acc"]) for r in rows if r[f"{split}_loss"] is not None]
            if pts:
                epochs, losses, accs = zip(*pts)
                axes[0].plot(epochs, losses, style, color=color, label=f"{name} {split}", markersize=4)
                axes[1].plot(epochs, accs, style, color=color, label=f"{name} {split}", markersize=4)
    epochs = sorted({int(r["epoch"]) for _, rows in runs for r in rows})
    for ax, what in zip(axes, ("loss", "accuracy")):
        ax.set_xlabel("epoch"), ax.set_ylabel(what), ax.grid(alpha=0.3)
        if 0 < len(epochs) <= 20:
            ax.set_xticks(epochs)
    fig.legend(*axes[1].get_legend_handles_labels(), fontsize=8, loc="outside right upper")
    fig.suptitle("train (solid) and validation (dashed) per epoch", fontsize=10)
    report.save_figure(fig, path, dpi=80, note="")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    runs = [run_row(path) for path in args.csv]  # every file read before any output
    print(table([cells for _, cells, _ in runs]))
    if args.out:
        plot([(name, rows) for name, _, rows in runs], args.out)
        print(f"\ncurves: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
