"""The seed's results table, measured: train the five models with train.py, one run each, and write
a Markdown + JSON table with the seed's test accuracy beside every row.

    python benchmarks/reproduce.py --preset full --weights imagenet     # the seed's settings (a GPU)
    python benchmarks/reproduce.py --preset cpu --weights $RESNET50_WEIGHTS   # 25-35 min on two CPU cores
    python benchmarks/reproduce.py --tiny                               # the plumbing only, seconds a model

Each model is one `python train.py --run-name <name> ...`: the table reads the run's CSV
(<log-dir>/<name>.csv: last epoch's train accuracy, best validation accuracy, training images/s),
its log line `N trainable of M parameters`, and its `Test Acc : x` line. The files go to
<out>/<preset>-<date>-<machine>.md and .json, with the exact command.
"""
import argparse
import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from bench import machine_info, machine_line  # noqa: E402

MODELS = ["sample_resnet", "resnet", "resnet_att", "resnet_scratch", "resnet_att_scratch"]
# The seed's README: test accuracy after 10 epochs at 224 px on the full training set.
SEED_TEST_ACC = {"sample_resnet": 0.6609, "resnet": 0.8443, "resnet_att": 0.8854,
                 "resnet_scratch": 0.9613, "resnet_att_scratch": 0.9631}

# ----------------------------------------------------------------------------------------------
# Presets: per model, train.py options (flag names without the dashes); train.py's defaults
# (batch 128, 5,000 validation images, per-model optimiser) apply to whatever is not listed.
FULL = dict(image_size=224, epochs=10, val_every=5)  # the seed's run: validation every 5 epochs
# CPU: 17 min on two EPYC cores (results/cpu-20261127-*). Calibrated with one short train.py run of each while other jobs
# kept the cores half busy (2 threads, OMP_WAIT_POLICY=PASSIVE), training img/s: sample_resnet@32
# 435, resnet@64 71, resnet_att@64 56, the two scratch models@64 21; evaluating a ResNet-50@64 ~75
# img/s. ResNet-50 costs grow with pixels, so the ResNet models see 64 px and a few thousand images;
# sample_resnet sees every image at 32 px.
CPU_EVAL = dict(val_split=1000, test_subset=2000)
CPU = {
    "sample_resnet": dict(image_size=32, epochs=2, val_split=1000),  # 49,000 train, the full test set
    "resnet": dict(image_size=64, epochs=2, train_subset=6000, **CPU_EVAL),
    "resnet_att": dict(image_size=64, epochs=2, train_subset=6000, **CPU_EVAL),
    "resnet_scratch": dict(image_size=64, epochs=2, train_subset=3000, **CPU_EVAL),
    "resnet_att_scratch": dict(image_size=64, epochs=2, train_subset=3000, **CPU_EVAL),
}
TINY = dict(image_size=32, epochs=1, train_subset=64, val_split=100, test_subset=64, batch_size=32)
# The two frozen models at the seed's scale on any machine: the head trains on cached features
# (features.py), so only the first run pays for the backbone (hours on two CPU cores).
FROZEN_FULL = dict(FULL, no_augment=True)
PRESETS = {
    "full": {m: dict(FULL) for m in MODELS},
    "frozen-full": {"resnet": FROZEN_FULL, "resnet_att": FROZEN_FULL},
    "cpu": CPU,
    "tiny": {m: dict(TINY) for m in MODELS},
}
KILL_GRACE_S = 60  # after SIGINT at the deadline, train.py saves last.pth; kill it if it hangs
# Defaults for the train.py runs (the caller's environment overrides them): on a CPU shared with
# other jobs, spinning OpenMP threads made train.py 3-4x slower here; sleeping costs ~nothing idle.
TRAIN_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--tiny", action="store_true", help="same as --preset tiny: 64 images, 1 epoch (tests)")
    p.add_argument("--models", nargs="+", choices=MODELS, help="default: the preset's models")
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="train each model once per seed (train.py --seed); the table shows mean ± std")
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_ROOT", "cifar"))
    p.add_argument("--weights", default=os.environ.get("RESNET50_WEIGHTS", "imagenet"),
                   help="ResNet-50 start of the four ResNet models (default: $RESNET50_WEIGHTS, else imagenet)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the train.py runs (default: torch's, the cores)")
    p.add_argument("--out", default=os.path.join(ROOT, "results"), help="where the table goes")
    p.add_argument("--log-dir", default=os.path.join(ROOT, "log"), help="train.py --log-dir")
    p.add_argument("--checkpoints", default=os.path.join(ROOT, "checkpoints"), help="train.py --out")
    args = p.parse_args(argv)
    if args.tiny:
        args.preset = "tiny"
    args.models = args.models or list(PRESETS[args.preset])
    missing = [m for m in args.models if m not in PRESETS[args.preset]]
    if missing:
        p.error(f"preset {args.preset} has no {', '.join(missing)}")
    return args


# ----------------------------------------------------------------------------------------------
# One run of train.py


def train_argv(model, opts, run_name, common):
    """train.py's command line: the shared options (data, weights, dirs), then the model's own,
    which override them."""
    argv = ["--model", model, "--run-name", run_name, "--overwrite", "--no-download"]
    for key, value in {**common, **opts}.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def run_train(argv, out_path, deadline=None, env=None):
    """`python train.py argv`, its output streamed to the console and saved to ``out_path``.
    At ``deadline`` (time.time()) it gets SIGINT: train.py saves last.pth and stops.
    -> (return code, output, wall seconds)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *argv]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**TRAIN_ENV, **os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    timers = []
    if deadline is not None:
        left = max(deadline - start, 0)
        timers = [threading.Timer(left, proc.send_signal, [signal.SIGINT]),
                  threading.Timer(left + KILL_GRACE_S, proc.kill)]
        for t in timers:
            t.start()
    lines = []
    with open(out_path, "w", buffering=1) as f:  # line-buffered: `tail -f` follows a long run
        f.write("$ python train.py " + shlex.join(argv) + "\n")
        for line in proc.stdout:
            print("    " + line, end="", flush=True)
            f.write(line)
            lines.append(line)
    rc = proc.wait()
    for t in timers:
        t.cancel()
    return rc, "".join(lines), time.time() - start


def read_run(csv_path, output):
    """The table's figures from train.py's CSV and output; None where the run did not get there."""
    rows = []
    if os.path.exists(csv_path):
        with open(csv_path) as f:
            rows = list(csv.DictReader(f))
    vals = [float(r["val_acc"]) for r in rows if r["val_acc"]]
    seconds = sum(float(r["seconds"]) for r in rows)
    images = sum(float(r["images_per_s"]) * float(r["seconds"]) for r in rows)
    params = re.search(r"([\d,]+) trainable of ([\d,]+) parameters", output)
    test = re.findall(r"Test Acc : ([\d.]+)", output)
    return {
        "epochs_done": len(rows),
        "train_acc": float(rows[-1]["train_acc"]) if rows else None,
        "best_val_acc": max(vals) if vals else None,
        "test_acc": float(test[-1]) if test else None,
        "train_img_s": round(images / seconds, 1) if seconds else None,
        "trainable_params": int(params.group(1).replace(",", "")) if params else None,
        "total_params": int(params.group(2).replace(",", "")) if params else None,
    }


def run_model(model, opts, common, dirs, stamp, deadline=None, env=None):
    """Train one model -> its table row."""
    name = f"{dirs['tag']}-{model}-{stamp}" + (f"-seed{opts['seed']}" if "seed" in opts else "")
    argv = train_argv(model, opts, name, common)
    rc, output, wall = run_train(argv, os.path.join(dirs["log"], f"{name}.out"), deadline, env)
    row = {"model": model, "run": name, "settings": opts, "command": "python train.py " + shlex.join(argv),
           "returncode": rc, "wall_s": round(wall, 1), "seed_test_acc": SEED_TEST_ACC[model],
           **read_run(os.path.join(dirs["log"], f"{name}.csv"), output)}
    if rc != 0:
        row["error"] = output.strip().splitlines()[-1] if output.strip() else f"exit code {rc}"
    return row


# ----------------------------------------------------------------------------------------------
# The table


def describe(opts, pool=50000):
    """The settings that make a row comparable (or not) to the seed's; ``pool``: training images
    in the data folder (before the validation split)."""
    parts = [f"{opts.get('image_size', 224)} px", f"{opts.get('epochs', 10)} ep",
             f"train {opts['train_subset']:,}" if opts.get("train_subset") else
             f"train {pool - opts.get('val_split', 5000):,} (all)",
             f"val {opts.get('val_split', 5000):,}",
             f"test {opts.get('test_subset', 10000):,}",
             f"batch {opts.get('batch_size', 128)}"]
    if opts.get("no_augment"):
        parts.append("no augmentation")
    if opts.get("weights") == "none":
        parts.append("random init")
    return ", ".join(parts)


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def spread(values, spec):
    """'mean ± std (n)' over the seeds' values; one value as it is."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return fmt(values[0] if values else None, spec)
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{format(mean, spec)} ± {format(std, spec)} ({len(values)})"


def by_model(rows):
    """Rows of the same model (one per seed) together, in order of first appearance."""
    groups = {}
    for r in rows:
        groups.setdefault(r["model"], []).append(r)
    return groups.values()


def markdown(rows, meta):
    short = meta["machine"]["gpu"] or f"{meta['machine']['cpu']}, {meta['machine']['cores']} cores"
    lines = [f"# Results: preset `{meta['preset']}`", "",
             f"Machine: {machine_line(meta['machine'])}. Date: {meta['date']}.", "",
             "Command:", "", "```", meta["command"], "```", "",
             "| model | settings | trainable params | train acc (last epoch) | best val acc | test acc | "
             "seed test acc | wall time | train img/s | machine |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for group in by_model(rows):
        r = group[0]
        failed = [g for g in group if g["returncode"]]
        note = "".join(f" (seed {g['settings'].get('seed', 0)}: {g['epochs_done']} ep done, exit {g['returncode']})"
                       for g in failed)
        seeds = f", seeds {', '.join(str(g['settings'].get('seed', 0)) for g in group)}" if len(group) > 1 else ""
        col = lambda key: [g[key] for g in group]
        lines.append(f"| {r['model']} | {describe(r['settings'], meta['train_pool'])}{seeds}{note} | "
                     f"{fmt(r['trainable_params'], ',')} | {spread(col('train_acc'), '.4f')} | "
                     f"{spread(col('best_val_acc'), '.4f')} | {spread(col('test_acc'), '.4f')} | "
                     f"{r['seed_test_acc']:.4f} | {sum(col('wall_s')) / 60:.1f} min | "
                     f"{spread(col('train_img_s'), ',.0f')} | {short} |")
    policy = meta["machine"].get("omp_wait_policy") or TRAIN_ENV["OMP_WAIT_POLICY"]
    threads = f" (OMP_WAIT_POLICY={policy}" + (f", OMP_NUM_THREADS={meta['threads']})" if meta.get("threads") else ")")
    lines += ["", f"ResNet-50 start of the four ResNet models: `{meta['weights']}` (sample_resnet has no "
              f"pretrained weights). Seed: 224 px, 10 epochs, all 45,000 training images, the full "
              f"10,000-image test set; rows with other settings are not comparable to its figures. "
              f"Wall time covers the whole train.py run{threads} (data, training, validation, test); "
              f"train img/s is training alone. Total wall time: {sum(r['wall_s'] for r in rows) / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def output_base(out_dir, preset, machine):
    slug = (machine["gpu"] or f"{machine['cpu']}-{machine['cores']}c").lower()
    slug = re.sub(r"[^a-z0-9]+", "-", slug).strip("-")
    return os.path.join(out_dir, f"{preset}-{time.strftime('%Y%m%d')}-{slug}")


def write_table(rows, meta, out_dir):
    """-> the .md path; the .json beside it holds the rows, settings and machine."""
    os.makedirs(out_dir, exist_ok=True)
    base = output_base(out_dir, meta["preset"], meta["machine"])
    with open(base + ".md", "w") as f:
        f.write(markdown(rows, meta))
    with open(base + ".json", "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=2)
    return base + ".md"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dirs = {"tag": args.preset, "log": args.log_dir}
    common = {"data_dir": args.data_dir, "weights": args.weights, "device": args.device,
              "log_dir": args.log_dir, "out": args.checkpoints}
    os.makedirs(args.log_dir, exist_ok=True)
    meta = {"preset": args.preset, "command": "python benchmarks/reproduce.py " + shlex.join(argv),
            "machine": machine_info(), "weights": args.weights, "train_pool": 50000, "threads": args.threads,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    rows = []
    for model in args.models:
        for seed in args.seeds:
            opts = dict(PRESETS[args.preset][model], **({"seed": seed} if args.seeds != [0] else {}))
            print(f"reproduce: {model}: {describe(opts)}, seed {seed}", flush=True)
            rows.append(run_model(model, opts, common, dirs, stamp, env=env))
        meta["total_wall_s"] = round(sum(r["wall_s"] for r in rows), 1)
        path = write_table(rows, meta, args.out)  # after every model: a cut-off run still has its table
    print("\n" + markdown(rows, meta) + f"\nwritten: {path} (and .json)")
    return 1 if any(r["returncode"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
