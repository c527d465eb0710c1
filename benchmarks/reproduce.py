"""The seed's results table, measured: train the five models with train.py, one run each, and write
a Markdown + JSON table with the seed's test accuracy beside every row.

    python benchmarks/reproduce.py --preset seed-cpu --weights $RESNET50_WEIGHTS \
        --log-dir ~/runs/seed-cpu/log --checkpoints ~/runs/seed-cpu/checkpoints   # the seed's scale, 2 CPU cores
    python benchmarks/reproduce.py --preset full --weights imagenet     # the seed's settings (a GPU)
    python benchmarks/reproduce.py --preset cpu --weights $RESNET50_WEIGHTS   # 25-35 min on two CPU cores
    python benchmarks/reproduce.py --tiny                               # the plumbing only, seconds a model
    python benchmarks/reproduce.py --preset seed-cpu --models resnet_scratch --epochs 4 ...   # a longer row

It can be stopped at any moment (^C, kill, the end of a session) and run again with the same
command: every row's run has a fixed name, <preset>-<model>-seed<seed>, so a second call
* skips the rows that are done (their log has the test accuracy): nothing is retrained;
* resumes an interrupted row from its last.pth (train.py saves one at ^C and every
  --checkpoint-every minutes), or restarts it, with a one-line warning, if that file is unreadable;
* shows a failed row with the run's own error line, and tries it again;
* leaves alone a row that another reproduce.py is training now ("running").
--adopt DIR takes finished runs from another folder (say results/frozen-224-cpu-20261128/) as the
rows of their model when their settings match the preset, without retraining them.

The table (<out>/<preset>.md and .json, rewritten after every row) reads each run's CSV (last
epoch's train accuracy, best validation accuracy, training images/s) and log (`N trainable of M
parameters`, `Test Acc : x`); each row lists the machines its segments ran on.
"""
import argparse
import contextlib
import ctypes
import fcntl
import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import checkpoints  # noqa: E402
from report import machine_info, machine_line, read_run  # noqa: E402
from utils import UserError, cpu_bf16_is_fast, read_text  # noqa: E402

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
# The seed's scale on two CPU cores (issue 18): 224 px, all 45,000 training images, the seed's
# augmentation, validation every epoch, the full test set. sample_resnet gets the seed's 10 epochs;
# the fine-tuned ResNet-50s a fifth of them (an epoch: 1.85 h in float32 on 2 Xeon cores, ~65 min in
# bf16 on 2 Zen 4 cores); the
# frozen rows are the cached-feature runs. Precision: see cpu_options().
SEED_CPU = {
    "sample_resnet": dict(image_size=224, epochs=10, val_every=1),
    "resnet": FROZEN_FULL,
    "resnet_att": FROZEN_FULL,
    "resnet_scratch": dict(image_size=224, epochs=2, val_every=1),
    "resnet_att_scratch": dict(image_size=224, epochs=2, val_every=1),
}
# The frozen rows as the seed trained them (issue 32): its augmentation, so every epoch runs the
# frozen backbone (without autograd) on 45,000 new crops; bf16 where the CPU is fast in it.
SEED_CPU_AUGMENTED = {"resnet": dict(image_size=224, epochs=10, val_every=1),
                      "resnet_att": dict(image_size=224, epochs=10, val_every=1)}
PRESETS = {
    "full": {m: dict(FULL) for m in MODELS},
    "seed-cpu-augmented": SEED_CPU_AUGMENTED,
    "frozen-full": {"resnet": FROZEN_FULL, "resnet_att": FROZEN_FULL},
    "seed-cpu": SEED_CPU,
    "cpu": CPU,
    "tiny": {m: dict(TINY) for m in MODELS},
}
KILL_GRACE_S = 60  # after SIGINT at the deadline, train.py saves last.pth; kill it if it hangs
# Defaults for the train.py runs (the caller's environment overrides them): on a CPU shared with
# other jobs, spinning OpenMP threads made train.py 3-4x slower here; sleeping costs ~nothing idle.
TRAIN_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
# Options a resumed run may be given anew (train.py's RESUME_OVERRIDABLE): where the data is and
# how this machine computes; every other option is the run's own, restored from its last.pth.
RESUME_OPTIONS = ("data_dir", "no_download", "device", "precision", "micro_batch", "checkpoint_every", "compile",
                  "cache_dir")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--tiny", action="store_true", help="same as --preset tiny: 64 images, 1 epoch (tests)")
    p.add_argument("--models", nargs="+", choices=MODELS, help="default: the preset's models")
    p.add_argument("--epochs", type=int, metavar="N",
                   help="train the rows for N epochs instead of the preset's: a table and runs of their own, "
                        "named <preset>-<N>ep (e.g. the fine-tuned seed-cpu rows beyond their 2 epochs)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="train each model once per seed (train.py --seed; every seed keeps seed 0's validation "
                        "split, --split-seed 0, so the frozen rows share one feature cache); the table shows "
                        "mean ± std")
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_ROOT", "cifar"))
    p.add_argument("--weights", default=os.environ.get("RESNET50_WEIGHTS", "imagenet"),
                   help="ResNet-50 start of the four ResNet models (default: $RESNET50_WEIGHTS, else imagenet)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="train.py --precision (default: bf16 on a CPU where it is ~2x faster, AMX or AMD Zen 4; else auto)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the train.py runs (default: torch's, the cores)")
    p.add_argument("--adopt", nargs="+", default=[], metavar="DIR",
                   help="folders of finished train.py runs (.log + .csv) to take as rows when their model and "
                        "settings match the preset's")
    p.add_argument("--out", default=os.path.join(ROOT, "results"), help="where the table goes")
    p.add_argument("--log-dir", default=os.path.join(ROOT, "log"), help="train.py --log-dir")
    p.add_argument("--checkpoints", default=os.path.join(ROOT, "checkpoints"), help="train.py --out")
    p.add_argument("--cache-dir", help="train.py --cache-dir: the frozen rows' feature cache (default: train.py's, "
                                       "cache/ in the repo)")
    args = p.parse_args(argv)
    if args.tiny:
        args.preset = "tiny"
    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs {args.epochs}: at least 1")
    args.table = args.preset + (f"-{args.epochs}ep" if args.epochs else "")  # names the runs and the table
    args.models = args.models or list(PRESETS[args.preset])
    missing = [m for m in args.models if m not in PRESETS[args.preset]]
    if missing:
        p.error(f"preset {args.preset} has no {', '.join(missing)}")
    return args


# Presets whose runs take hours on a CPU: they get this machine's fastest settings (cpu_options).
LONG_CPU_PRESETS = ("seed-cpu", "seed-cpu-augmented")
# The fastest setting per precision and model that keeps a run under a third of the machine's 24 GB,
# measured by benchmarks/cpu_speed.py (results/speed-cpu-20261202-intel-xeon-amx-2c.md, 2-core Xeon
# with AMX, global batch 128, 224 px): bf16 sample_resnet compiled 61 img/s (eager 48); bf16
# ResNet-50 in micro-batches of 64 20.6 img/s, 5.6 GB (whole: 18.5, 9.4 GB; compiled: no faster);
# float32 in micro-batches of 32 is the fastest and smallest (ResNet-50 9.3 img/s, 5.7 GB; whole
# batch 7.5 img/s, 19 GB). On a 2-core AMD Zen 4 (results/speed-cpu-2026120[23]-amd-epyc-zen4-2c*)
# the same bf16 picks hold: ResNet-50 micro 64 11.7 img/s, 5.3 GB (whole 10.8, 8.8 GB);
# sample_resnet compiled 1.04x eager, every bf16 setting within 30-33 img/s.
CPU_SETTINGS = {
    "bf16": {"sample_resnet": dict(compile=True), "resnet_scratch": dict(micro_batch=64),
             "resnet_att_scratch": dict(micro_batch=64)},
    "fp32": {m: dict(micro_batch=32) for m in ("sample_resnet", "resnet_scratch", "resnet_att_scratch")},
}


def cpu_options(args, model):
    """This machine's speed options for one row's train.py: for the long CPU presets, bf16 autocast
    where it is faster on this CPU (utils.cpu_bf16_is_fast: AMX, or AMD Zen 4; ResNet-50 training
    about 2.2x float32's speed), float32 elsewhere, and that precision's fastest setting from
    CPU_SETTINGS. Passed again at every resume: a run may move to another machine
    between sessions. --precision decides the precision."""
    if args.preset not in LONG_CPU_PRESETS or args.device == "cuda":
        return {"precision": args.precision} if args.precision else {}
    precision = args.precision or ("bf16" if cpu_bf16_is_fast() else "fp32")
    return {"precision": precision, **CPU_SETTINGS.get(precision, {}).get(model, {})}


# ----------------------------------------------------------------------------------------------
# One run of train.py


def run_name(table, model, seed):
    """A row's fixed run name: the same command finds its run again."""
    return f"{table}-{model}-seed{seed}"


def train_argv(model, opts, name, common):
    """train.py's command line for a fresh run: the shared options (data, weights, dirs), then the
    model's own, which override them."""
    return ["--model", model, "--run-name", name, "--overwrite", "--no-download"] + flags({**common, **opts})


def resume_argv(last, opts, common):
    """train.py's command line to continue a row: the run's own arguments come from ``last``; the
    speed options (the row's, then this machine's) are given again."""
    return ["--resume", last, "--no-download"] + flags({k: v for k, v in {**opts, **common}.items()
                                                        if k in RESUME_OPTIONS})


def flags(options):
    argv = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def die_with_parent():
    """In the child: SIGTERM when reproduce.py dies, even by kill -9, so train.py saves last.pth and
    stops instead of training on unseen (and racing a re-run of the same row)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_train(argv, out_path, deadline=None, env=None, keep_fds=()):
    """`python train.py argv`, its output streamed to the console and appended to ``out_path``.
    At ``deadline`` (time.time()) it gets SIGINT: train.py saves last.pth and stops. A ^C or
    SIGTERM to reproduce.py is passed on the same way. ``keep_fds``: open to the child too (the
    row's lock, held until train.py has exited). -> (return code, output, wall seconds)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *argv]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**TRAIN_ENV, **os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            preexec_fn=die_with_parent, start_new_session=True, pass_fds=keep_fds)
    forward = lambda signum, frame: proc.send_signal(signal.SIGINT)  # train.py: save, then exit
    handlers = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    timers = []
    if deadline is not None:
        left = max(deadline - start, 0)
        timers = [threading.Timer(left, proc.send_signal, [signal.SIGINT]),
                  threading.Timer(left + KILL_GRACE_S, proc.kill)]
        for t in timers:
            t.start()
    lines = []
    try:
        with open(out_path, "a", buffering=1) as f:  # line-buffered: `tail -f` follows a long run
            f.write("$ python train.py " + shlex.join(argv) + "\n")
            for line in proc.stdout:
                print("    " + line, end="", flush=True)
                f.write(line)
                lines.append(line)
        rc = proc.wait()
    finally:
        for t in timers:
            t.cancel()
        for s, h in handlers.items():
            signal.signal(s, h)
    return rc, "".join(lines), time.time() - start


def error_line(output, rc):
    """The run's own one-line error (train.py: error: ...), else its last line, else the exit code."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ": error: " in ln]
    return errors[-1] if errors else (lines[-1] if lines else f"exit code {rc}")


# ----------------------------------------------------------------------------------------------
# A row: where its run stands, and what is left to do


class Row:
    """One (model, seed) of the table and its run's files: <log>/<name>.log/.csv/.out, the
    segments record <log>/<name>.segments.json (each train.py process: machine, wall time, exit
    code), and <checkpoints>/<name>/last.pth."""

    def __init__(self, model, seed, opts, args):
        self.model, self.seed, self.opts = model, seed, opts
        self.name = run_name(args.table, model, seed)
        self.log_base = os.path.join(args.log_dir, self.name)
        self.last = os.path.join(args.checkpoints, self.name, checkpoints.LAST)
        self.lock_path = self.log_base + ".lock"
        self.adopted = None  # the log of a finished run taken from --adopt
        self.status, self.error, self.lock = "pending", None, None

    def done(self):
        return "Test Acc : " in read_text(self.log_path())

    def log_path(self):
        return self.adopted or self.log_base + ".log"

    def segments(self):
        try:
            with open(self.log_base + ".segments.json") as f:
                return json.load(f)
        except (OSError, ValueError):
            return []

    def add_segment(self, segment):
        segments = self.segments() + [segment]
        tmp = self.log_base + ".segments.json.tmp"
        with open(tmp, "w") as f:
            json.dump(segments, f, indent=1)
        os.replace(tmp, self.log_base + ".segments.json")

    def claim(self):
        """Take the row's lock: False when another reproduce.py (or the train.py it started, which
        shares the lock until it exits) trains it now."""
        self.lock = open(self.lock_path, "a")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            self.lock.close()
            self.lock = None
            return False

    def release(self):
        if self.lock:
            self.lock.close()
            self.lock = None

    def table_row(self, preset_common):
        log_path = self.log_path()
        figures = read_run(log_path[:-len(".log")] + ".csv", read_text(log_path))
        segments = self.segments()
        machines = sorted({s["machine"] for s in segments if s.get("machine")})
        command = ("adopted: " + self.adopted) if self.adopted else (
            "python train.py " + shlex.join(train_argv(self.model, self.opts, self.name, preset_common)))
        if self.adopted:  # no process record: its training time, and its machine is said where it came from
            wall, machines = figures["train_s"] or None, [f"see {os.path.dirname(self.adopted)}"]
        else:
            wall = round(sum(s.get("wall_s", 0) for s in segments), 1) if segments else None
        return {"model": self.model, "run": self.name, "settings": self.opts, "command": command,
                "status": self.status, "error": self.error, "seed_test_acc": SEED_TEST_ACC[self.model],
                "returncode": 0 if self.status in ("done", "adopted") else (1 if self.status == "failed" else None),
                "wall_s": wall, "segments": len(segments), "machines": machines, **figures}


def adopt(row, folders):
    """The log of a finished run in ``folders`` whose model and settings (image size, epochs, batch,
    the log's first line) are the row's, or None."""
    o = row.opts
    want = (f": {row.model}, ", f"image size {o.get('image_size', 224)}, batch {o.get('batch_size', 128)}",
            f", {o.get('epochs', 10)} epochs")
    for folder in folders:
        for log in sorted(glob.glob(os.path.join(folder, "*.log"))):
            text = read_text(log)
            first = text.splitlines()[0] if text else ""
            if all(w in first for w in want) and "Test Acc : " in text and os.path.exists(log[:-4] + ".csv"):
                return os.path.abspath(log)
    return None


def train_row(row, common, env):
    """Train (or finish) one row's run: fresh, resumed, or restarted when its last.pth is unreadable."""
    os.makedirs(os.path.dirname(row.last), exist_ok=True)
    argv = None
    if os.path.exists(row.last):
        try:
            checkpoints.load_checkpoint(row.last)
            argv = resume_argv(row.last, row.opts, common)
            print(f"reproduce: {row.name}: resuming from {row.last}", flush=True)
        except UserError as e:
            print(f"reproduce: warning: {row.name}: {e}; restarting the run", flush=True)
    if argv is None:
        argv = train_argv(row.model, row.opts, row.name, common)
        print(f"reproduce: {row.name}: {describe(row.opts)}", flush=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    rc, output, wall = run_train(argv, row.log_base + ".out", env=env, keep_fds=(row.lock.fileno(),))
    m = machine_info()
    row.add_segment({"start": started, "wall_s": round(wall, 1), "returncode": rc, "argv": argv,
                     "machine": f"{m['cpu']} ({m['cores']} cores){', ' + m['gpu'] if m['gpu'] else ''}"})
    if rc == 0 and row.done():
        row.status = "done"
    elif rc in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        row.status = "stopped"
    else:
        row.status, row.error = "failed", error_line(output, rc)
    return rc


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
    parts.append("no augmentation" if opts.get("no_augment") else "seed's augmentation")
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


def row_status(r):
    status = r.get("status") or ("done" if not r.get("returncode") else "failed")
    if status == "failed":
        return f"failed: {r.get('error') or 'exit code ' + str(r.get('returncode'))}"
    if status == "stopped":
        return f"stopped after {r.get('epochs_done', 0)} ep (resumes)"
    return status


def markdown(rows, meta):
    short = meta["machine"]["gpu"] or f"{meta['machine']['cpu']}, {meta['machine']['cores']} cores"
    epochs = f", {meta['epochs']} epochs" if meta.get("epochs") else ""
    lines = [f"# Results: preset `{meta['preset']}`{epochs}", "",
             f"Machine of this call: {machine_line(meta['machine'])}. Date: {meta['date']}.", "",
             "Command (run it again to continue: finished rows are kept, interrupted ones resume):", "",
             "```", meta["command"], "```", "",
             "| model | status | settings | trainable params | train acc (last epoch) | best val acc | test acc | "
             "seed test acc | wall time | train img/s | machine |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for group in by_model(rows):
        r = group[0]
        seeds = f", seeds {', '.join(str(g['settings'].get('seed', 0)) for g in group)}" if len(group) > 1 else ""
        col = lambda key: [g.get(key) for g in group]
        walls = [w for w in col("wall_s") if w is not None]
        machines = sorted({m for g in group for m in g.get("machines") or []})
        if not machines:  # rows of the older format (one call, this machine), or not started yet
            machines = [short] if any(g.get("status", "done") != "pending" for g in group) else ["-"]
        status = "; ".join(dict.fromkeys(row_status(g) for g in group))
        lines.append(f"| {r['model']} | {status} | {describe(r['settings'], meta['train_pool'])}{seeds} | "
                     f"{fmt(r.get('trainable_params'), ',')} | {spread(col('train_acc'), '.4f')} | "
                     f"{spread(col('best_val_acc'), '.4f')} | {spread(col('test_acc'), '.4f')} | "
                     f"{r['seed_test_acc']:.4f} | {fmt(sum(walls) / 60 if walls else None, '.1f')} min | "
                     f"{spread(col('train_img_s'), ',.0f')} | {'; '.join(machines)} |")
    policy = meta["machine"].get("omp_wait_policy") or TRAIN_ENV["OMP_WAIT_POLICY"]
    threads = f" (OMP_WAIT_POLICY={policy}" + (f", OMP_NUM_THREADS={meta['threads']})" if meta.get("threads") else ")")
    lines += ["", f"ResNet-50 start of the four ResNet models: `{meta['weights']}` (sample_resnet has no "
              f"pretrained weights). Seed: 224 px, 10 epochs, all 45,000 training images, the full "
              f"10,000-image test set; rows with other settings are not comparable to its figures. "
              f"Wall time covers every train.py process of the row{threads} (data, training, validation, "
              f"test; an adopted row's is its training time); train img/s is training alone."]
    speed = {m: " ".join(flags(o)) for m, o in (meta.get("options") or {}).items() if o}
    if speed:
        lines.append("Speed options of this call (this machine's, benchmarks/cpu_speed.py): "
                     + "; ".join(f"{m} `{o}`" for m, o in speed.items()) + ".")
    return "\n".join(lines) + "\n"


def write_table(rows, meta, out_dir):
    """-> the .md path; the .json beside it holds the rows, settings and machine."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, meta["table"])
    for ext, text in ((".md", markdown(rows, meta)), (".json", json.dumps({**meta, "rows": rows}, indent=2))):
        tmp = base + ext + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, base + ext)
    return base + ".md"


# ----------------------------------------------------------------------------------------------
# The driver


def seed_options(seed, seeds):
    """train.py's seed options of one row: none for the one default seed 0 (the older rows' command
    lines), else --seed, with seed 0's split (--split-seed 0) so that every seed of a model trains,
    validates and is tested on the same images, and the frozen rows reuse one feature cache."""
    if seeds == [0]:
        return {}
    return {"seed": seed} if seed == 0 else {"seed": seed, "split_seed": 0}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    options = {m: cpu_options(args, m) for m in args.models}
    common = {"data_dir": args.data_dir, "weights": args.weights, "device": args.device,
              "log_dir": args.log_dir, "out": args.checkpoints, "cache_dir": args.cache_dir}
    row_common = lambda row: {**common, **options[row.model]}  # this machine's speed options last
    os.makedirs(args.log_dir, exist_ok=True)
    meta = {"preset": args.preset, "epochs": args.epochs, "table": args.table,
            "command": "python benchmarks/reproduce.py " + shlex.join(argv),
            "machine": machine_info(), "weights": args.weights, "train_pool": 50000, "threads": args.threads,
            "options": options, "date": time.strftime("%Y-%m-%d %H:%M")}
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    rows = [Row(model, seed, dict(PRESETS[args.preset][model], **seed_options(seed, args.seeds),
                                  **({"epochs": args.epochs} if args.epochs else {})), args)
            for model in args.models for seed in args.seeds]
    for row in rows:
        if not row.done():
            row.adopted = adopt(row, args.adopt) if row.seed == 0 else None
        row.status = "adopted" if row.adopted else ("done" if row.done() else "pending")

    table = lambda: write_table([r.table_row(row_common(r)) for r in rows], meta, args.out)
    interrupted = False
    for row in rows:
        if row.status != "pending":
            continue
        if not row.claim():
            row.status = "running"  # another reproduce.py has it
            continue
        try:
            row.status = "running"
            table()
            rc = train_row(row, row_common(row), env)
        finally:
            row.release()
        table()
        if rc in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            interrupted = rc
            break
    path = table()
    print("\n" + read_text(path) + f"\nwritten: {path} (and .json)")
    if interrupted:
        print("reproduce: stopped; run the same command again to continue", flush=True)
        return interrupted
    return 1 if any(r.status == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
