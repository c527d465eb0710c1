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
import csv
import os
import re
import sys

import checkpoints
import report
from utils import Parser, UserError, run_cli

MISSING = "\u2014"  # an em dash: not known
RUN_LINE = re.compile(r"^(?:run|resuming) (?P<run>\S+): (?P<model>\S+), (?P<trainable>[\d,]+) trainable of "
                      r"[\d,]+ parameters, .*?image size (?P<size>\d+), .*, (?P<epochs>\d+) epochs$")
TEST_LINE = re.compile(r"^Test Acc : (?P<acc>[\d.]+)$")
CACHED_LINE = re.compile(r"^(head|linear probe) training on cached features")
CKPT_LINE = re.compile(r"^checkpoints: (?P<dir>.+)/ \(last\.pth, (?P<best>[^)]+)\); log: ")


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


def read_csv(path):
    """train.py's CSV -> [{field: float or None}] per epoch, or a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist")
    not_ours = f"{path} is not a train.py CSV (columns {','.join(report.CSV_FIELDS)})"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header != report.CSV_FIELDS:
                raise UserError(not_ours)
            rows = []
            for n, cells in enumerate(reader, start=2):
                if len(cells) != len(header):
                    raise UserError(f"{not_ours}: line {n} has {len(cells)} cells")
                rows.append({k: float(v) if v else None for k, v in zip(header, cells)})
    except (UnicodeDecodeError, csv.Error, ValueError) as e:
        raise UserError(f"{not_ours}: {' '.join(str(e).split())[:120]}") from None
    if any(r["epoch"] is None or r["train_acc"] is None for r in rows):
        raise UserError(f"{not_ours}: a row without epoch or train accuracy")
    return rows


def read_log(path):
    """What the run's .log says: {run, model, trainable, size, epochs, test_acc, ckpt_dir, best, cached};
    {} if absent."""
    if not os.path.isfile(path):
        return {}
    found = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if (m := RUN_LINE.match(line)) and "model" not in found:  # the first: a resumed run repeats it
                found.update(m.groupdict())
            elif m := TEST_LINE.match(line):
                found["test_acc"] = float(m["acc"])
            elif (m := CKPT_LINE.match(line)) and "ckpt_dir" not in found:
                found.update(ckpt_dir=m["dir"], best=m["best"])
            elif CACHED_LINE.match(line):  # a frozen model's head trained on the backbone's cached features
                found["cached"] = True
    return found


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
    rows = read_csv(csv_path)
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
    done = len(rows)
    vals = [r["val_acc"] for r in rows if r["val_acc"] is not None]
    seconds = sum(r["seconds"] or 0 for r in rows)
    images = sum((r["images_per_s"] or 0) * (r["seconds"] or 0) for r in rows)
    train_images = (args.get("train_subset") or 50000 - args["val_split"]) if "val_split" in args else None
    fmt = lambda v, spec: MISSING if v is None else format(v, spec)
    cells = [
        name, info.get("model", args.get("model", MISSING)),
        fmt(rows[-1]["train_acc"] if rows else None, ".4f"),
        fmt(max(vals) if vals else None, ".4f"),
        fmt(test, ".4f") if test is not None else ("running" if info else MISSING),
        info.get("trainable", MISSING),
        (str(done) if planned in (None, done) else f"{done} of {planned}"),
        info.get("size", str(args["image_size"]) if "image_size" in args else MISSING),
        fmt(train_images, ","),
        duration(seconds) if rows else MISSING,
        fmt(images / seconds if seconds else None, ",.0f") + (" (head, cached features)" if info.get("cached") else ""),
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
