"""What the user reads and looks at: the run's log lines (the seed's format), its CSV, the loss and
accuracy curves, the confusion matrix, live curves in TensorBoard, progress bars for every long
phase, and the machine a figure was measured on; and reading a run's CSV and log back for the
tables of compare.py and the benchmarks."""
import csv
import json
import logging
import os
import platform
import re
import sys
import time
import zipfile

import numpy as np
import torch

from utils import UserError, atomic_path, cpu_has_amx, cpu_has_avx512_bf16, cpu_name

CSV_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s"]


# ----------------------------------------------------------------------------------------------
# The log: the console and log/<run>.log, the same lines


def cannot_write(path, error, note="; the checkpoints are intact"):
    reason = getattr(error, "strerror", None) or error
    return UserError(f"could not write {path}: {reason}{note}")


class LogFile(logging.FileHandler):
    """A log file whose write errors (disk full, read-only) stop the run with one line, instead of
    logging's traceback on stderr and a run that goes on without its log."""

    def handleError(self, record):
        raise cannot_write(self.baseFilename, sys.exc_info()[1])


def setup_logging(name, log_file, master):
    """The logger ``name`` writing plain lines to stdout and ``log_file``; silent on ranks > 0."""
    log = logging.getLogger(name)
    log.setLevel(logging.INFO)
    log.handlers.clear()
    log.propagate = False
    if not master:
        log.addHandler(logging.NullHandler())
        return log
    try:
        file_handler = LogFile(log_file)
    except OSError as e:
        raise cannot_write(log_file, e) from None
    for handler in (logging.StreamHandler(sys.stdout), file_handler):
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    return log


def open_run_log(args, rt, run_dir, log_base, resuming, params, best_name):
    """The run's log (the console and <log-dir>/<run>.log), opened with a line of its settings."""
    if rt.master:
        try:
            os.makedirs(args.log_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {args.log_dir}: {e.strerror or e}") from None
    log = setup_logging("train", log_base + ".log", rt.master)
    chunks = f" in chunks of {args.micro_batch}" if args.micro_batch and args.micro_batch < args.batch_size else ""
    log.info(f"{'resuming' if resuming else 'run'} {os.path.basename(log_base)}: {args.model}, {params} parameters, "
             f"{rt.device}{f' x{rt.world_size}' if rt.world_size > 1 else ''} {rt.precision}, image size "
             f"{args.image_size}, batch {args.batch_size}{chunks}, {args.optimizer} lr {args.lr}, {args.epochs} epochs")
    log.info(f"checkpoints: {run_dir}/ (last.pth, {best_name}); log: {log_base}.log/.csv/.png")
    return log


def epoch_row(epoch, train_loss, train_acc, lr, seconds, images, val=None):
    """One epoch's CSV row: ``val`` is (loss, accuracy) when it validated; images/s is blank when
    no step of the epoch ran in this process (a resumed epoch that only validated)."""
    val_loss, val_acc = (f"{v:.5f}" for v in val) if val else ("", "")
    return {"epoch": epoch, "train_loss": f"{train_loss:.5f}", "train_acc": f"{train_acc:.5f}",
            "val_loss": val_loss, "val_acc": val_acc, "lr": f"{lr:.6g}", "seconds": f"{seconds:.1f}",
            "images_per_s": f"{images / seconds:.1f}" if images else ""}


def append_csv(path, row):
    new = not os.path.exists(path)
    try:
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, CSV_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
    except OSError as e:
        raise cannot_write(path, e) from None


# ----------------------------------------------------------------------------------------------
# Figures


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def plot_curves(csv_path, png_path):
    plt = pyplot()
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-o"), ("val", "-s")):
        pts = [(int(r["epoch"]), float(r[f"{split}_loss"]), float(r[f"{split}_acc"])) for r in rows if r[f"{split}_loss"]]
        if pts:
            epochs, losses, accs = zip(*pts)
            ax_loss.plot(epochs, losses, style, label=split)
            ax_acc.plot(epochs, accs, style, label=split)
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch"), ax.set_ylabel(name), ax.grid(alpha=0.3), ax.legend()
    fig.suptitle(os.path.basename(csv_path)[:-4])
    fig.tight_layout()
    save_figure(fig, png_path)


def save_figure(fig, path, dpi=100, note="; the checkpoints are intact", metadata=None):
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=dpi, metadata=metadata)
    except OSError as e:
        raise cannot_write(path, e, note) from None
    finally:
        pyplot().close(fig)


def confusion_figure(confusion, classes, title=None):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted"), ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if confusion[i, j] > confusion.max() / 2 else "black")
    fig.colorbar(im)
    fig.tight_layout()
    return fig


def confusion_title(what, acc, confusion):
    """What a confusion matrix shows: whose it is, and the accuracy and image count it adds up to, on two
    lines (one was wider than the figure for a seed-scale run's name and was cut off)."""
    return f"{what}:\ntest accuracy {acc:.4f} on {int(confusion.sum()):,} images"


def plot_confusion(confusion, classes, path, title=None):
    """The PNG; ``title`` is drawn above the matrix and kept as the PNG's "Title" text too."""
    save_figure(confusion_figure(confusion, classes, title), path, metadata={"Title": title} if title else None)


def reliability_figure(cal, title=None):
    """The reliability diagram of ``cal`` (stats.calibration): per confidence bin, its accuracy (blue)
    and mean confidence (red outline; on the diagonal when calibrated), and below, how many images
    each bin holds."""
    plt = pyplot()
    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(6, 6.5), height_ratios=(3, 1), sharex=True)
    width = cal.edges[1] - cal.edges[0]
    filled = cal.count > 0
    ax.bar(cal.edges[:-1][filled], cal.accuracy[filled], width=width, align="edge", edgecolor="black",
           color="tab:blue", label="accuracy")
    ax.bar(cal.edges[:-1][filled], cal.confidence[filled], width=width, align="edge", fill=False,
           edgecolor="tab:red", linewidth=1.5, label="mean confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_ylabel("accuracy"), ax.set_xlim(0, 1), ax.set_ylim(0, 1), ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    ax_count.bar(cal.edges[:-1], cal.count, width=width, align="edge", edgecolor="black", color="tab:gray")
    ax_count.set_yscale("symlog"), ax_count.set_xlabel("confidence (top probability)"), ax_count.set_ylabel("images")
    fig.tight_layout()
    return fig


def calibration_title(what, cal):
    """Like confusion_title: whose diagram it is, then the ECE, its bins and the image count."""
    return f"{what}:\nECE {cal.ece:.4f} ({len(cal.count)} bins) on {int(cal.count.sum()):,} images"


def plot_reliability(cal, path, title=None):
    save_figure(reliability_figure(cal, title), path, metadata={"Title": title} if title else None)


def checkpoint_label(path):
    """A checkpoint named by its run folder and file only, e.g. "<run>/ResNet_att.pth": a whole path
    (~/runs/<preset>/checkpoints/<run>/X.pth) is wider than a figure and was cut off."""
    return os.path.join(*os.path.normpath(path).split(os.sep)[-2:])


# ----------------------------------------------------------------------------------------------
# TensorBoard: live curves (--tensorboard)

TENSORBOARD_PIN = "tensorboard==2.21.0"  # requirements.txt's


class TensorBoard:
    """Event files under ``folder`` for ``tensorboard --logdir``; every method is a no-op when not
    ``enabled`` (the flag not given, or a rank > 0). Every point is at the run's global step
    (epoch * steps per epoch + step), so a resumed run continues the same curves: ``purge_step``
    (the step it resumes after, + 1) hides what a killed process logged past its last checkpoint,
    so the curves have no overlap either."""

    def __init__(self, folder, enabled, purge_step=None):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(f"--tensorboard needs the tensorboard package: pip install {TENSORBOARD_PIN}",
                            exit_code=2) from None
        try:
            self.writer = SummaryWriter(folder, purge_step=purge_step or None)
        except OSError as e:
            raise cannot_write(folder, e) from None

    def scalars(self, step, prefix, **values):
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def test_results(self, step, loss, acc, confusion, classes, hparams, best_val_acc):
        """The end of a run: the test loss and accuracy, the confusion matrix as a figure, and the
        run's hyperparameters beside its results, for TensorBoard's HParams view."""
        if self.writer:
            self.scalars(step, "test", loss=loss, acc=acc)
            self.writer.add_figure("test/confusion_matrix", confusion_figure(confusion, classes), step)
            plain = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()
                     if v is not None}
            self.writer.add_hparams(plain, {"hparam/test_acc": acc, "hparam/best_val_acc": best_val_acc},
                                    run_name=".")  # in this run's folder, not a new one

    def close(self):
        if self.writer:
            self.writer.close()
            self.writer = None


# ----------------------------------------------------------------------------------------------
# Reading a run back (compare.py, benchmarks/reproduce.py, benchmarks/gpu_check.py): its CSV and log

RUN_LINE = re.compile(r"^(?:run|resuming) (?P<run>\S+): (?P<model>\S+), (?P<trainable>[\d,]+) trainable of "
                      r"(?P<total>[\d,]+) parameters, .*?image size (?P<size>\d+), .*, (?P<epochs>\d+) epochs$")
TEST_LINE = re.compile(r"^Test Acc : (?P<acc>[\d.]+)$")
CACHED_LINE = re.compile(r"^(head|linear probe) training on cached features")
CKPT_LINE = re.compile(r"^checkpoints: (?P<dir>.+)/ \(last\.pth, (?P<best>[^)]+)\); log: ")
# the training images: train.py's "data:" line; logs older than it, a frozen run's feature-cache line
TRAIN_IMAGES_LINES = [re.compile(r"^data: .*?, (?P<n>[\d,]+) train / "),
                      re.compile(r"^train: (?P<n>[\d,]+) images' \w+ features from the cache "),
                      re.compile(r"^computing the frozen backbone's .* features of the (?P<n>[\d,]+) train images ")]


def read_csv(path):
    """train.py's CSV -> [{field: float or None}] per epoch, or a one-line UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist")
    not_ours = f"{path} is not a train.py CSV (columns {','.join(CSV_FIELDS)})"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header != CSV_FIELDS:
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


def parse_log(text):
    """What a run's log (or its output) says: {run, model, trainable, total, size, epochs, test_acc,
    ckpt_dir, best, cached, train_images}, each where a line says it."""
    found = {}
    for line in text.splitlines():
        if (m := RUN_LINE.match(line)) and "model" not in found:  # the first: a resumed run repeats it
            found.update(m.groupdict())
        elif m := TEST_LINE.match(line):
            found["test_acc"] = float(m["acc"])
        elif (m := CKPT_LINE.match(line)) and "ckpt_dir" not in found:
            found.update(ckpt_dir=m["dir"], best=m["best"])
        elif CACHED_LINE.match(line):  # a frozen model's head trained on the backbone's cached features
            found["cached"] = True
        elif "train_images" not in found and (m := next(filter(None, (r.match(line) for r in TRAIN_IMAGES_LINES)),
                                                        None)):
            found["train_images"] = int(m["n"].replace(",", ""))
    return found


def run_figures(rows, info):
    """The figures a table shows of one run, from its CSV rows (read_csv) and its log (parse_log);
    None where the run did not get there. Images/s counts only the epochs that trained in the
    process that wrote the row (blank: a resumed epoch that only validated)."""
    vals = [r["val_acc"] for r in rows if r["val_acc"] is not None]
    timed = [r for r in rows if r["images_per_s"]]
    seconds = sum(r["seconds"] for r in timed)
    images = sum(r["images_per_s"] * r["seconds"] for r in timed)
    count = lambda key: int(info[key].replace(",", "")) if key in info else None
    return {"epochs_done": len(rows), "train_acc": rows[-1]["train_acc"] if rows else None,
            "best_val_acc": max(vals) if vals else None, "test_acc": info.get("test_acc"),
            "train_img_s": round(images / seconds, 1) if seconds else None, "train_s": round(seconds, 1),
            "trainable_params": count("trainable"), "total_params": count("total")}


def read_run(csv_path, log_text):
    """run_figures of a run from its CSV's path (missing: no epoch done yet) and its log's text."""
    return run_figures(read_csv(csv_path) if os.path.exists(csv_path) else [], parse_log(log_text))


# ----------------------------------------------------------------------------------------------
# Per-image test predictions: <log>/<run>-test.npz (train.py), beside evaluate.py's confusion PNG

PREDICTIONS_FORMAT = 1
MAX_PREDICTIONS_BYTES = 1 << 30  # uncompressed: 10,000 images x 10 classes is 0.2 MB; more is not ours


def predictions_path(log_base):
    """Where train.py writes a run's test predictions, and where compare.py looks for them beside its CSV."""
    return log_base + "-test.npz"


# A run's settings: two runs that differ in nothing else but --seed are seeds of one configuration
# (compare.py groups them). Where the data is, how fast the machine computes, and the names of
# files are not settings.
SETTINGS = ("model", "weights", "epochs", "batch_size", "lr", "optimizer", "weight_decay", "label_smoothing",
            "image_size", "no_augment", "val_split", "train_subset", "test_subset")


def run_settings(args):
    """The SETTINGS of a run's arguments (a dict), as files handed to others keep them: a local
    weights file by its name, not where it lay on the training machine."""
    weights = args.get("weights")
    if weights not in (None, "imagenet", "imagenet_v2", "none"):
        weights = os.path.basename(str(weights))
    settings = {k: args.get(k) for k in SETTINGS}
    settings["weights"] = None if args.get("model") == "sample_resnet" else weights  # sample_resnet ignores it
    return settings


def predictions_meta(dataset, classes, args, run, checkpoint, epoch, loss, acc):
    """What a predictions file says of itself: the data set and classes, the run, its seed and
    settings (SETTINGS of train.py's ``args``), the checkpoint and its epoch, the test loss and accuracy."""
    return {"dataset": dataset, "classes": list(classes), "run": run, "seed": args.get("seed"),
            "settings": run_settings(args), "checkpoint": checkpoint, "epoch": epoch,
            "test_loss": round(float(loss), 6), "test_acc": round(float(acc), 6)}


def save_predictions(path, probs, labels, indices, meta, predicted=None):
    """The test set's softmax probabilities (float16, N x classes), the predicted classes (the
    argmax of the float32 logits: float16 rounding can tie two classes, so the argmax of the
    stored probabilities may differ from what the run counted), labels and image indices (into the
    data set's test images), and ``meta`` (JSON: dataset, classes, model, run, settings, ...),
    written atomically: a reader sees the old file or the whole new one."""
    if predicted is None:
        predicted = torch.as_tensor(probs).float().argmax(1)
    probs, labels, indices, predicted = (np.asarray(a) for a in (probs, labels, indices, predicted))
    if not (len(probs) == len(labels) == len(indices)) or probs.ndim != 2:
        raise ValueError(f"predictions of {len(probs)} images, {len(labels)} labels, {len(indices)} indices")
    meta = dict(meta, format=PREDICTIONS_FORMAT)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, probs=probs.astype(np.float16), predicted=predicted.astype(np.int64),
                                labels=labels.astype(np.int64),
                                indices=indices.astype(np.int64), meta=np.array(json.dumps(meta, sort_keys=True)))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise cannot_write(path, e) from None


def read_predictions(path):
    """A predictions file -> {probs float32 (N, C), predicted, labels, indices, correct (bool), meta},
    every field checked; anything else (any bytes) is a one-line UserError."""
    bad = lambda why: UserError(f"{path} is not a predictions file of this project ({why}); train.py and "
                                f"evaluate.py write them")
    try:
        with zipfile.ZipFile(path) as z:
            names = {i.filename: i.file_size for i in z.infolist()}
        if set(names) != {"probs.npy", "predicted.npy", "labels.npy", "indices.npy", "meta.npy"}:
            raise bad(f"holds {', '.join(sorted(names))[:80] or 'nothing'}")
        if sum(names.values()) > MAX_PREDICTIONS_BYTES:
            raise bad(f"{sum(names.values()):,} bytes uncompressed")
        with np.load(path, allow_pickle=False) as z:
            probs, predicted, labels, indices, meta = (z[k] for k in ("probs", "predicted", "labels", "indices", "meta"))
        meta = json.loads(str(meta[()]))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 -- np.load, zipfile and numpy's header parser (tokenize, ast)
        # raise a zoo of exception types on arbitrary bytes: any of them means "not ours"
        raise bad(" ".join(str(e).split())[:100] or type(e).__name__) from None
    problem = predictions_problem(probs, predicted, labels, indices, meta)
    if problem:
        raise bad(problem)
    return {"probs": probs.astype(np.float32), "predicted": predicted, "labels": labels, "indices": indices,
            "correct": predicted == labels, "meta": meta}


def predictions_problem(probs, predicted, labels, indices, meta):
    """Why these arrays are not what save_predictions writes, or None."""
    if not isinstance(meta, dict) or meta.get("format") != PREDICTIONS_FORMAT:
        return "no format number " + str(PREDICTIONS_FORMAT)
    classes = meta.get("classes")
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        return "no list of class names"
    if not isinstance(meta.get("dataset"), str):
        return "no data set name"
    n = len(labels) if labels.ndim == 1 else -1
    if probs.dtype != np.float16 or probs.shape != (n, len(classes)) or n < 1:
        return f"probabilities {probs.dtype} {probs.shape}, labels {labels.shape}, {len(classes)} classes"
    if any(a.dtype != np.int64 or a.shape != labels.shape for a in (indices, predicted)):
        return f"labels {labels.shape}, indices {indices.dtype} {indices.shape}, predicted {predicted.dtype} " \
               f"{predicted.shape}"
    if labels.min() < 0 or labels.max() >= len(classes) or indices.min() < 0 or len(np.unique(indices)) != n:
        return "labels out of range or repeated image indices"
    if not np.isfinite(probs).all() or probs.min() < 0 or np.abs(probs.astype(np.float32).sum(1) - 1).max() > 0.02:
        return "rows that are not probabilities"
    if predicted.min() < 0 or predicted.max() >= len(classes) or \
            (probs.max(1) - probs[np.arange(n), predicted]).astype(np.float32).max() > 2e-3:
        return "predicted classes that are not the most probable ones"
    return None


# ----------------------------------------------------------------------------------------------
# Progress


class Progress:
    """Progress of long work (what, how far, images/s, ETA): tqdm on a terminal; elsewhere (a log
    file, CI) one plain line at most every ``every_s`` seconds, and one at the end."""

    def __init__(self, total, desc, unit="img", initial=0, every_s=30.0, enabled=True):
        self.total, self.desc, self.unit, self.n, self.every_s = total, desc, unit, initial, every_s
        self.enabled, self.start_n = enabled, initial
        self.start = self.last_print = time.time()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, leave=False)

    def rate(self):
        return (self.n - self.start_n) / max(time.time() - self.start, 1e-9)

    def line(self, extra=""):
        rate = self.rate()
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        return (f"  {self.desc}: {self.n:,}/{self.total:,} {self.unit}  {rate:.1f} {self.unit}/s  "
                f"eta {format_seconds(eta)}{extra}")

    def update(self, n, **postfix):
        self.n += n
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif self.enabled and (time.time() - self.last_print >= self.every_s or self.n >= self.total):
            self.last_print = time.time()
            print(self.line("".join(f"  {k} {v}" for k, v in postfix.items())), flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def format_seconds(s):
    if s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class EpochProgress:
    """The training epoch's progress: tqdm on a terminal; otherwise about ten plain lines an epoch
    ("  epoch E/N step S/T  loss  acc  img/s  eta"). ``show`` is called at the loop's log points,
    where the meter is read anyway, so the bar costs no extra host synchronisation."""

    def __init__(self, total, epoch, epochs, first_step, enabled):
        self.total, self.epoch, self.epochs, self.first_step = total, epoch, epochs, first_step
        self.enabled, self.start, self.bar = enabled, time.time(), None
        self.every = max(total // 10, 1)
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", initial=first_step, leave=False,
                            dynamic_ncols=True)

    def wants(self, step):
        """Whether step ``step`` (1-based) is a log point."""
        return self.enabled and (step % self.every == 0 or step == self.total or
                                 (self.bar is not None and step % max(self.every // 10, 1) == 0))

    def show(self, step, loss, acc, images):
        rate = images / max(time.time() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", img_s=f"{rate:.0f}", refresh=False)
            self.bar.update(step - self.bar.n)
            return
        steps_rate = (step - self.first_step) / max(time.time() - self.start, 1e-9)
        print(f"  epoch {self.epoch + 1}/{self.epochs} step {step}/{self.total}  loss {loss:.4f}  acc {acc:.4f}  "
              f"{rate:.0f} img/s  eta {(self.total - step) / max(steps_rate, 1e-9):.0f}s", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------
# The machine a figure was measured on


def machine_info():
    """CPU (model name, cores, instruction set), GPU, versions: what every measured figure names."""
    cpu = cpu_name()
    cuda = torch.cuda.is_available()
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "isa": torch.backends.cpu.get_cpu_capability() + (" + AVX512_BF16" if cpu_has_avx512_bf16() else "")
                   + (" + AMX" if cpu_has_amx() else ""),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "torch": str(torch.__version__), "python": platform.python_version(),
            "host": platform.node()}


def machine_line(m):
    gpu = f", {m['gpu']}" if m["gpu"] else ""
    isa = f", {m['isa']}" if m.get("isa") else ""
    return f"{m['cpu']} ({m['cores']} cores{isa}){gpu}, torch {m['torch']}"
