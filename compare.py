"""Runs side by side, and which of their differences are real.

    python compare.py log/sample_resnet-20261127-101500.csv log/resnet_att-20261127-103000.csv --out runs.png
    python compare.py results/<dir>/*.csv              # the committed rows: no checkpoint needed
    python compare.py checkpoints/<run>/ResNet_att-test.npz ...   # evaluate.py's predictions alone

Printed as Markdown: one row per run; then, from the per-image test predictions each run wrote
beside its CSV (log/<run>-test.npz; report.read_predictions), how sure the comparison is (stats.py):
each run's test accuracy with its 95% Wilson interval; for every two runs tested on the same
images, the change in accuracy, the images only one of them gets right, McNemar's exact p-value and
a 95% paired-bootstrap interval (10,000 resamples, a fixed seed: the same table every time); runs
that differ only in --seed grouped as one setting (n, mean ± std, min-max), and two such settings
compared by the paired t-test of their seeds (same seeds) or Welch's t-test; and all of it in words.

A run is train.py's log/<run>.csv, with the log/<run>.log beside it and the checkpoints that log
names. The table (stdout) has, per run: model, train accuracy of the last epoch, best validation
accuracy, test accuracy (the log's `Test Acc`), trainable parameters, epochs, image size, training
images (the log's "data:" line; a log older than that line, the run's arguments in its
checkpoint), training wall time (the epochs' `seconds`
summed: training steps only, not data loading, validation or test) and training images/s (a frozen
model trained on cached features, --no-augment: its head's; the backbone ran once, before). What
cannot be known yet (a run still going has no test accuracy; a deleted checkpoint, no arguments)
is printed as "running" or an em dash, and said on stderr; so is a run without predictions (it
gets no interval or test), and two runs on different test images (no paired test).
"""
import argparse
import json
import os
import sys

import numpy as np

import checkpoints
import data
import report
import stats
from utils import Parser, UserError, read_text, run_cli

MISSING = "\u2014"  # an em dash: not known

def parse_args(argv):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+", metavar="LOG.csv",
                   help="train.py's per-epoch CSV of each run (its predictions <run>-test.npz beside it), or a "
                        "predictions file (.npz) of evaluate.py or train.py alone")
    p.add_argument("--out", metavar="PNG", help="the curves figure (default: the table only)")
    p.add_argument("--all-pairs", action="store_true",
                   help="a paired test for every two runs; by default runs of different settings with the same "
                        "seed (seeds of one setting are summarised by their spread instead)")
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


def read_predictions_beside(csv_path, name):
    """The predictions train.py wrote beside the run's CSV, or None (said on stderr)."""
    path = report.predictions_path(os.path.splitext(csv_path)[0])
    if not os.path.isfile(path):
        warn(f"{name}: no predictions {path}: no interval or paired test for it (train.py writes them at the "
             f"end of a run; evaluate.py CHECKPOINT writes them for an older run)")
        return None
    return report.read_predictions(path)


def checkpoint_settings(name, log_path, info):
    """(train.py's arguments, class names) from the run's checkpoint; ({}, None) if it is gone."""
    ckpt = find_checkpoint(log_path, info)
    if not ckpt:
        warn(f"{name}: no checkpoint in {info.get('ckpt_dir', '(not named in the log)')}/ (deleted?) and no "
             f"'data:' line in its log: training images unknown")
        return {}, None
    try:
        loaded = checkpoints.load_checkpoint(ckpt)
        return loaded["args"], loaded["classes"]
    except UserError as e:
        warn(f"{name}: {e}; training images unknown")
        return {}, None


def run_row(csv_path):
    """One run -> (name, table cells, epochs rows, predictions or None); what is missing is said on stderr."""
    if csv_path.endswith(".npz"):
        return predictions_row(csv_path)
    rows = report.read_csv(csv_path)
    name = os.path.splitext(os.path.basename(csv_path))[0]
    log_path = os.path.splitext(csv_path)[0] + ".log"
    info = read_log(log_path)
    if not info:
        warn(f"{name}: no log {log_path} (or no run line in it): model, parameters, image size, test "
             f"accuracy and training images are unknown")
    args, classes = {}, None
    if info and "train_images" not in info:  # a log older than its "data:" line: the checkpoint says it
        args, classes = checkpoint_settings(name, log_path, info)
    test = info.get("test_acc")
    if info and test is None:
        warn(f"{name}: no 'Test Acc' line in {log_path} yet: still running, or stopped before the test")
    planned = int(info["epochs"]) if "epochs" in info else args.get("epochs")
    figures = report.run_figures(rows, info)
    done = figures["epochs_done"]
    train_images = info.get("train_images") or cifar_train_images(args, classes == list(data.CLASSES))
    fmt = lambda v, spec: MISSING if v is None else format(v, spec)
    cells = [
        name, info.get("model", args.get("model", MISSING)),
        fmt(figures["train_acc"], ".4f"),
        fmt(figures["best_val_acc"], ".4f"),
        fmt(test, ".4f") if test is not None else ("running" if info else MISSING),
        MISSING,  # the interval: from the predictions (add_intervals)
        fmt(figures["trainable_params"], ","),
        (str(done) if planned in (None, done) else f"{done} of {planned}"),
        info.get("size", str(args["image_size"]) if "image_size" in args else MISSING),
        fmt(train_images, ","),
        duration(figures["train_s"]) if rows else MISSING,
        fmt(figures["train_img_s"], ",.0f") + (" (head, cached features)" if info.get("cached") else ""),
    ]
    return name, cells, rows, read_predictions_beside(csv_path, name) if info.get("test_acc") is not None else None


def predictions_row(path):
    """A predictions file alone (evaluate.py's, or a run's without its CSV): the cells it can fill."""
    pred = report.read_predictions(path)
    meta, settings = pred["meta"], pred["meta"].get("settings") or {}
    name = str(meta.get("run") or os.path.splitext(os.path.basename(path))[0])
    checkpoint = str(meta.get("checkpoint") or "")
    if checkpoint:  # evaluate.py's are <run>/<file>.pth already, train.py's the file alone
        name = checkpoint if "/" in checkpoint else f"{name}/{checkpoint}"
    cells = [name, str(settings.get("model", MISSING)), MISSING, MISSING, f"{pred['correct'].mean():.4f}", MISSING,
             MISSING, str(meta.get("epoch", MISSING)), str(settings.get("image_size", MISSING)),
             fmt_count(cifar_train_images(settings, meta.get("dataset") == data.DATASET)), MISSING, MISSING]
    return name, cells, [], pred


def cifar_train_images(settings, cifar):
    """A run's training images from its settings: its --train-subset, or CIFAR-10's 50,000 less
    its --val-split; None (unknown) for another data set without a subset."""
    held = settings.get("val_split")
    if settings.get("train_subset"):
        return settings["train_subset"]
    if not cifar or held is None:
        return None
    return 50000 - data.cifar_held_out(held)


def fmt_count(v):
    return MISSING if v is None else f"{v:,}"


def add_intervals(runs):
    """Each run's 95% Wilson interval of its test accuracy, from its predictions, into its cells."""
    for name, cells, _, pred in runs:
        if pred is not None:
            low, high = stats.wilson_interval(pred["correct"].sum(), len(pred["correct"]))
            cells[5] = f"[{low:.4f}, {high:.4f}] ({len(pred['correct']):,} images)"


def duration(s):
    return f"{s:.1f} s" if s < 60 else report.format_seconds(s)


HEADER = ["run", "model", "train acc (last epoch)", "best val acc", "test acc", "95% CI (Wilson)", "trainable params",
          "epochs",
          "image size", "train images", "train wall time", "train img/s"]


def table(rows, header=HEADER, left=2):
    """A Markdown table: the first ``left`` columns left-aligned, the others (figures) right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * left + ["---:"] * (len(header) - left)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


# ----------------------------------------------------------------------------------------------
# Which differences are real


def same_images(a, b):
    """None when the two predictions are of the same test images (data set, classes, indices and
    labels), else why not, in a few words."""
    ma, mb = a["meta"], b["meta"]
    if ma["dataset"] != mb["dataset"] or ma["classes"] != mb["classes"]:
        return f"other data sets ({ma['dataset']}, {len(ma['classes'])} classes against {mb['dataset']}, " \
               f"{len(mb['classes'])} classes)"
    if len(a["indices"]) != len(b["indices"]):
        return f"{len(a['indices']):,} against {len(b['indices']):,} test images"
    if not np.array_equal(a["indices"], b["indices"]):
        return f"other test images (subsets of {len(a['indices']):,} drawn with other seeds)"
    if not np.array_equal(a["labels"], b["labels"]):
        return "the same image indices with other labels (another data set's files?)"
    return None


def setting_key(pred):
    """What makes two runs seeds of one setting: their settings (report.SETTINGS) and test images."""
    meta = pred["meta"]
    return json.dumps([meta.get("settings"), meta["dataset"], pred["indices"].tolist()], sort_keys=True)


def pairs_to_test(with_pred, all_pairs=False):
    """The pairs of runs to test: every pair with ``all_pairs`` or when all runs are seeds of one
    setting; else the pairs of runs of different settings, those with the same seed where a seed is
    shared (per seed the split, batches and draws match), all of them for two settings that share no seed."""
    pairs = [(a, b) for i, a in enumerate(with_pred) for b in with_pred[i + 1:]]
    keys = {name: setting_key(pred) for name, pred in with_pred}
    if all_pairs or len(set(keys.values())) <= 1:
        return pairs
    seeds = {name: pred["meta"].get("seed") for name, pred in with_pred}
    across = [(a, b) for a, b in pairs if keys[a[0]] != keys[b[0]]]
    both = lambda a, b: frozenset((keys[a[0]], keys[b[0]]))
    shared = {both(a, b) for a, b in across if seeds[a[0]] == seeds[b[0]]}
    return [(a, b) for a, b in across if both(a, b) not in shared or seeds[a[0]] == seeds[b[0]]]


def paired_tests(runs, all_pairs=False):
    """-> (table rows, sentences) for the pairs of runs with predictions (pairs_to_test); a pair
    on different images is refused, one line on stderr each."""
    rows, words = [], []
    with_pred = [(name, pred) for name, _, _, pred in runs if pred is not None]
    for (name_a, a), (name_b, b) in pairs_to_test(with_pred, all_pairs):
        why = same_images(a, b)
        if why:
            warn(f"{name_a} vs {name_b}: no paired test, they were not tested on the same images ({why})")
            continue
        t = stats.paired(a["correct"], b["correct"])
        rows.append([name_a, name_b, f"{t.n:,}", f"{100 * t.delta:+.2f}", f"{t.only_a:,}", f"{t.only_b:,}",
                     stats.format_p(t.p_value), f"[{100 * t.ci[0]:+.2f}, {100 * t.ci[1]:+.2f}]"])
        words.append(stats.verdict(name_a, name_b, t.delta, t.ci, t.p_value))
    return rows, words


PAIRED_HEADER = ["A", "B", "images", "Δ acc A−B (points)", "only A right", "only B right", "p (McNemar exact)",
                 "95% CI of Δ (paired bootstrap)"]


def setting_groups(runs):
    """Runs with predictions grouped by their settings (all of train.py's options that shape the
    result, report.SETTINGS, but the seed) and test images -> [(label, [(seed, accuracy)])]."""
    groups = {}
    for name, _, _, pred in runs:
        if pred is None:
            continue
        meta = pred["meta"]
        members = groups.setdefault(setting_key(pred), [])
        if any(seed == meta.get("seed") for seed, _, _ in members):
            warn(f"{name}: the same setting and seed ({meta.get('seed')}) as a run before it: counted once among "
                 f"the seeds")
            continue
        members.append((meta.get("seed"), float(pred["correct"].mean()), meta.get("settings") or {}))
    return [(group_label(members[0][2], [g[0][2] for g in groups.values()]), [(s, acc) for s, acc, _ in members])
            for members in groups.values()]


def group_label(settings, all_settings):
    """The model's name, with the settings in which it differs from another group of the same model."""
    model = settings.get("model", "?")
    same_model = [s for s in all_settings if s.get("model") == model]
    differ = sorted({k for s in same_model for k in set(s) | set(settings) if s.get(k) != settings.get(k)})
    return model + (f" ({', '.join(f'{k}={settings.get(k)}' for k in differ)})" if differ else "")


def seed_tables(groups):
    """-> (rows of the settings with 2 seeds or more, rows of setting-against-setting tests, sentences)."""
    several = [(label, members) for label, members in groups if len(members) >= 2]
    spread_rows = []
    for label, members in several:
        s = stats.spread([acc for _, acc in members])
        spread_rows.append([label, str(s.n), f"{s.mean:.4f} ± {s.std:.4f}", f"{s.low:.4f}–{s.high:.4f}",
                            ", ".join(str(seed) for seed, _ in members)])
    test_rows, words = [], []
    for i, (label_a, a) in enumerate(several):
        for label_b, b in several[i + 1:]:
            d = stats.group_difference([acc for _, acc in a], [acc for _, acc in b], [s for s, _ in a],
                                       [s for s, _ in b])
            name_a, name_b = f"{label_a} (n={len(a)})", f"{label_b} (n={len(b)})"
            test_rows.append([name_a, name_b, d.test, f"{100 * d.delta:+.2f}",
                              f"[{100 * d.ci[0]:+.2f}, {100 * d.ci[1]:+.2f}]", stats.format_p(d.p_value)])
            words.append(stats.verdict(name_a, name_b, d.delta, d.ci, d.p_value))
    return spread_rows, test_rows, words


SPREAD_HEADER = ["setting", "n", "test acc mean ± std", "min–max", "seeds"]
GROUP_HEADER = ["A", "B", "test", "Δ mean acc A−B (points)", "95% CI of Δ", "p"]


def significance_report(runs, all_pairs=False):
    """The Markdown sections after the runs' table: paired tests, seeds, and the sentences."""
    paired_rows, words = paired_tests(runs, all_pairs)
    spread_rows, group_rows, group_words = seed_tables(setting_groups(runs))
    parts = []
    if paired_rows:
        parts += [f"Paired tests on the same test images: McNemar's exact test on the images only one run gets "
                  f"right, and a 95% interval of Δ from {stats.BOOTSTRAP_RESAMPLES:,} paired bootstrap resamples "
                  f"(seed {stats.BOOTSTRAP_SEED}).", "", table(paired_rows, PAIRED_HEADER)]
    if spread_rows:
        parts += ["", "Seeds of one setting (test accuracy; std over seeds, n - 1):", "",
                  table(spread_rows, SPREAD_HEADER, left=1)]
    if group_rows:
        parts += ["", "Setting against setting, over their seeds (paired t-test when both have the same seeds, "
                      "else Welch's t-test):", "", table(group_rows, GROUP_HEADER, left=3)]
    if words or group_words:
        parts += ["", f"In words (a difference is called real at p < {stats.SIGNIFICANCE}):", ""]
        parts += [f"- {w}" for w in words + group_words]
    return "\n".join(parts)


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
    add_intervals(runs)
    print(table([cells for _, cells, _, _ in runs]))
    more = significance_report(runs, args.all_pairs)
    if more:
        print("\n" + more)
    if args.out:
        plot([(name, rows) for name, _, rows, _ in runs if rows], args.out)
        print(f"\ncurves: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
