"""What a lent GPU should tell us first, in the order of what it is worth (docs/gpus.md, "The GPU check").

    python3 benchmarks/gpu_check.py --data-dir cifar --out $OUT                  # a device call: timeout_s 250
    python benchmarks/gpu_check.py --rehearse --budget 300 --out /tmp/rehearsal   # the whole script on the CPU

Pass 1, each check in its own process group under its own limit, most valuable first:
  versions   GPU, driver, CUDA, cuDNN, torch, torchvision (this process)
  tests      the CPU tests of test_engine and test_models on the device's torch
  parity     the batched augmentation on the device against the CPU, TF32 off and on (expect ~1e-6, ~1e-3)
  stop, resume, evaluate   a tiny train.py on the device: --stop-after 1, --resume, evaluate.py; the
             stopped run's last.pth comes back as device-last.pth for the CPU to resume and evaluate
  torchrun   one process under torchrun (NCCL on CUDA)
  sync       test_engine's CUDA tests: the real step (fused SGD and AdamW, channels_last, cuDNN
             benchmark) and evaluate() under torch.cuda.set_sync_debug_mode("error")
  bench      eager training and evaluation images/s of the five models (the seed-style loop for one)
  compile    torch.compile of one model, with whatever time pass 1 has left
A check still running at its limit gets SIGINT GRACE_S before it (train.py saves last.pth, pytest
and bench.py report what they measured), then SIGKILL, its whole process group with it.

Pass 2 (only when --budget leaves PASS2_MIN_S after pass 1): accuracy runs on the data folder,
each with the epochs its measured throughput fits. --full-data instead trains one model (--model)
per call on the whole staged set (benchmarks/stage_data.py), with as many epochs as fit.

Written at --out's top level (a device call brings back at most 8 files, 2 folders down), all of it
rewritten after every check: gpu-<time>-<gpu>.md and .json (every check with its status),
logs.tar.gz (every check's log, the runs' logs and CSVs, bench.py's JSON) and device-last.pth. The
work folder (logs, checkpoints) is a temporary folder outside --out, removed at the end.
"""
import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from report import machine_info, machine_line, read_run  # noqa: E402
from utils import read_text  # noqa: E402

# Time. A device call of timeout_s 250 with the default budget leaves room for a second call
# within 15 minutes of machine time, two start-ups included (docs/gpus.md, "The GPU check").
BUDGET_S = 220  # the whole script, by default
PACK_S = 10  # kept for the last report and tarball
GRACE_S = 15  # SIGINT to SIGKILL: train.py ends its step and saves last.pth; pytest and bench.py report
MIN_CHECK_S = 5  # a check with less time left than this is skipped
PASS2_MIN_S = 60  # pass 2 runs only when --budget leaves it this much after pass 1
FULL_DATA_BENCH_S = 60  # --full-data: pass 1 is the versions and its model's bench, at most this long

# Pass 1 in order of worth: (check, limit in seconds on CUDA, on the CPU of a rehearsal). None:
# whatever pass 1 has left. The CUDA limits with PACK_S fit BUDGET_S (tests/test_gpu_check.py).
CHECKS = [("versions", None, None), ("tests", 30, 70), ("parity", 15, 30), ("stop", 25, 45), ("resume", 20, 45),
          ("evaluate", 15, 30), ("torchrun", 30, 60), ("sync", 20, 40), ("bench", 45, 80), ("compile", None, None)]
# What each device runs: pass 1's share of the budget, the tests, bench.py's and the tiny run's sizes.
SIZES = {
    "cuda": dict(first_pass_s=BUDGET_S - PACK_S, image_size=224,
                 tests=["tests/test_engine.py", "tests/test_models.py"],
                 bench="--steps 5 --warmup 2 --min-seconds 0.5", compile_model="resnet_scratch",
                 tiny="--image-size 64 --train-subset 1024 --batch-size 128"),
    # a rehearsal on two (shared) CPU cores: tiny sizes, one test file, inductor on the small model
    "cpu": dict(first_pass_s=200, image_size=32, tests=["tests/test_engine.py"],
                bench="--batch-size 8 --steps 1 --warmup 1 --min-seconds 0 --workers 1", compile_model="sample_resnet",
                tiny="--image-size 32 --train-subset 128 --batch-size 32"),
}
PARITY_LIMITS = {"tf32_off": 1e-4, "tf32_on": 5e-2}  # max |device - CPU| of normalised pixels (range ~[-2, 2.7])

MODELS = ["sample_resnet", "resnet", "resnet_att", "resnet_scratch", "resnet_att_scratch"]
SEED_TEST_ACC = {"sample_resnet": 0.6609, "resnet": 0.8443, "resnet_att": 0.8854,  # the seed's README
                 "resnet_scratch": 0.9613, "resnet_att_scratch": 0.9631}
ACCURACY_ORDER = ["resnet_att_scratch", "resnet_scratch", "sample_resnet"]  # fine-tuned first: no CPU figure
FROZEN_MODELS = ["resnet_att", "resnet"]  # a random frozen backbone measures nothing: only with --weights
SEED_SIDE_MODEL = "resnet_scratch"
TRAIN_POOL, VAL_SPLIT = 10_000, 1000  # data_batch_1.bin alone
FULL_POOL, FULL_VAL_SPLIT = 50_000, 5000  # every batch staged: the seed's split
FALLBACK_EPOCHS = 5  # when the bench measured nothing for a model (the deadline still applies)
RUN_OVERHEAD_S = 30  # per train.py run: start-up, data, cuDNN autotuning, validation, test at 224 px
SAFETY = 0.7  # of bench's step throughput for train.py's epochs (logging, validation)
MAX_EPOCHS = 30


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--rehearse", action="store_true",
                   help="the whole script on the CPU at tiny sizes: --device cpu, 32 px, tiny runs (budget 300 s)")
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_ROOT", "cifar"))
    p.add_argument("--weights", help="ImageNet ResNet-50 file: the ResNet models of pass 2 start from it")
    p.add_argument("--out", help="default: $OUT if set, else results/gpu-check-<time>")
    p.add_argument("--budget", type=float, help=f"seconds for the whole script (default {BUDGET_S}; rehearsal 300)")
    p.add_argument("--checks", nargs="+", choices=[c for c, _, _ in CHECKS],
                   help="run only these checks of pass 1 (resume and evaluate need stop)")
    p.add_argument("--first-pass-only", action="store_true", help="no pass 2")
    p.add_argument("--full-data", action="store_true",
                   help="one model per call on all 50,000 staged images (stage_data.py), 5,000 for validation, "
                        "as many epochs as fit the budget")
    p.add_argument("--model", choices=MODELS, default=ACCURACY_ORDER[0], help="--full-data's model")
    p.add_argument("--epochs", type=int, help="pass 2, per model (default: as many as fit)")
    p.add_argument("--train-subset", type=int, help="pass 2 (default: all that the validation split leaves)")
    p.add_argument("--test-subset", type=int, help="pass 2 (default: all 10,000)")
    p.add_argument("--parity-json", help=argparse.SUPPRESS)  # internal: the parity check's process
    args = p.parse_args(argv)
    if args.rehearse:
        args.device = "cpu"
        args.budget = args.budget or 300
        args.epochs = args.epochs or 1
        args.train_subset = args.train_subset or 256
        args.test_subset = args.test_subset or 128
    args.budget = args.budget or BUDGET_S
    if args.budget < PACK_S + 2 * MIN_CHECK_S:
        p.error(f"--budget {args.budget:g} leaves no time for a check (at least {PACK_S + 2 * MIN_CHECK_S} s)")
    args.out = args.out or os.environ.get("OUT") or os.path.join(ROOT, "results",
                                                                 time.strftime("gpu-check-%Y%m%d-%H%M%S"))
    args.train_pool, args.val_split = (FULL_POOL, FULL_VAL_SPLIT) if args.full_data else (TRAIN_POOL, VAL_SPLIT)
    if args.full_data:
        if args.model in FROZEN_MODELS and not args.weights:
            p.error(f"--model {args.model} trains a head on a frozen backbone: it needs --weights")
        args.checks = ["versions", "bench"]  # pass 1 was an earlier call's; this one trains
    return args


# ----------------------------------------------------------------------------------------------
# Running a check: its own process group, SIGINT before its limit, nothing left behind


def signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # the group is empty already
        pass


def exited(proc, seconds):
    """Wait up to ``seconds`` for ``proc`` to exit, without reaping it: while it is a zombie its pid,
    the id of its process group, cannot be reused, so the group can still be signalled safely."""
    end = time.monotonic() + seconds
    while True:
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.05)


def run_group(cmd, log_path, limit, env=None, grace=GRACE_S, cwd=ROOT):
    """``cmd`` in a new process group, its output to ``log_path``. At ``limit - grace`` seconds the
    group gets SIGINT (a ^C: train.py saves last.pth and stops, pytest reports what ran), at
    ``limit`` SIGKILL; whatever is left of the group when it ends (torchrun's workers after their
    agent) is killed. -> (return code, None or 'interrupted' or 'killed', seconds)."""
    grace = min(grace, limit / 3)
    start = time.monotonic()
    with open(log_path, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    stopped = None
    try:
        if not exited(proc, max(limit - grace, 0)):
            signal_group(proc.pid, signal.SIGINT)
            stopped = "interrupted"
            if not exited(proc, grace):
                stopped = "killed"
    finally:
        signal_group(proc.pid, signal.SIGKILL)  # the stragglers of any exit, or the check itself at its limit
        rc = proc.wait()
    return rc, stopped, round(time.monotonic() - start, 1)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def last_line(text):
    """The line that says most: a one-line error (`...: error: ...`) if any, else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("$ ")]
    errors = [ln for ln in lines if ": error: " in ln]
    return (errors or lines or [""])[-1][:300]


# ----------------------------------------------------------------------------------------------
# Parity of the batched augmentation (the parity check's own process)


def max_difference(a, b):
    """Largest |a - b| over two loaders' batches, compared in lockstep. Each pair is compared before
    either loader draws its next batch: the CPU TensorLoader writes every batch into one reused
    buffer, so a list of its batches would hold the last batch N times."""
    worst, batches = 0.0, 0
    for (x, _), (y, _) in zip(a, b, strict=True):
        worst = max(worst, (x.float().cpu() - y.float().cpu()).abs().max().item())
        batches += 1
    return worst if batches else float("nan")


def parity(device):
    """{tf32_off, tf32_on: {train, eval: max difference}} of the augmentation on ``device`` against
    the CPU, same images and draws, as train.py loads them (channels_last)."""
    import numpy as np
    import torch
    import data
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 64)
    out = {}
    for tf32 in (False, True):  # train.py turns TF32 on (utils.setup_runtime); the CPU side stays exact
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        out["tf32_on" if tf32 else "tf32_off"] = {
            split: max_difference(*(data.TensorLoader(x, y, 32, 224, split == "train", d, seed=1, channels_last=True)
                                    for d in (device, "cpu")))
            for split in ("train", "eval")}
    return out


def parity_verdict(result):
    """None when every difference is within PARITY_LIMITS, else what is not."""
    worst = {mode: max(result[mode].values()) for mode in PARITY_LIMITS}
    bad = [f"{mode} {worst[mode]:.3g} > {PARITY_LIMITS[mode]:g}" for mode in PARITY_LIMITS
           if not worst[mode] <= PARITY_LIMITS[mode]]
    return "; ".join(bad) or None


# ----------------------------------------------------------------------------------------------
# Pass 1


class Checks:
    """Pass 1: every check has a row from the start ('pending'), filled as it runs; ``publish`` is
    called after each."""

    def __init__(self, args, work, deadline, publish):
        self.args, self.work, self.deadline, self.publish = args, work, deadline, publish
        self.size = SIZES[args.device]
        self.limits = {name: (cuda if args.device == "cuda" else cpu) for name, cuda, cpu in CHECKS}
        wanted = args.checks or list(self.limits)
        self.rows = [{"check": name, "status": "pending" if name in wanted else "not selected (--checks)",
                      "ok": None, "seconds": 0, "summary": ""} for name in self.limits]

    def row(self, name):
        return next(r for r in self.rows if r["check"] == name)

    def left(self):
        return self.deadline - time.time()

    def run(self, name, cmd, env=None, parse=None, cwd=ROOT):
        """Run one check (unless not selected, or out of time) and publish the report."""
        row = self.row(name)
        if row["status"] != "pending":
            return row
        limit = min(self.limits[name] or math.inf, self.left())
        if limit < MIN_CHECK_S:
            row.update(status="skipped: pass 1 out of time", ok=False)
        else:
            log = os.path.join(self.work, "logs", f"check-{name}.log")
            rc, stopped, seconds = run_group(cmd, log, limit, env, cwd=cwd)
            row.update(returncode=rc, seconds=seconds, limit=round(limit), summary=last_line(read_text(log)))
            finish(row, rc, stopped, parse)
        self.publish()
        return row

    def train_cmd(self, *argv):
        """The tiny run, from the work folder: its checkpoint names relative --out and --log-dir, so
        the CPU side resumes device-last.pth from wherever it puts it."""
        return [sys.executable, os.path.join(ROOT, "train.py"), "--model", "sample_resnet", "--device",
                self.args.device, "--data-dir", os.path.abspath(self.args.data_dir), "--no-download", "--val-split",
                "100", "--test-subset", "200", "--out", "ck", "--log-dir", "logs", *shlex.split(self.size["tiny"]),
                *argv]

    def pytest_cmd(self, *argv):
        return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *argv]

    def bench_cmd(self, json_path, *argv):
        return [sys.executable, os.path.join(HERE, "bench.py"), "--device", self.args.device, "--json", json_path,
                "--image-size", str(self.size["image_size"]), *shlex.split(self.size["bench"]), *argv]

    def all(self, versions_info):
        a, py, w = self.args, sys.executable, self.work
        partial = {"CIFAR10_PARTIAL": "1"}  # data_batch_1.bin alone is enough
        if self.row("versions")["status"] == "pending":
            self.row("versions").update(status="ok", ok=True, summary=versions_line(versions_info))
            self.publish()
        self.run("tests", self.pytest_cmd("-k", "not cuda", *self.size["tests"]))
        parity_json = os.path.join(w, "logs", "parity.json")
        self.run("parity", [py, __file__, "--parity-json", parity_json, "--device", a.device],
                 parse=lambda: parity_row(read_json(parity_json)))
        last = os.path.join(w, "ck", "device", "last.pth")
        self.run("stop", self.train_cmd("--epochs", "2", "--stop-after", "1", "--run-name", "device"), partial,
                 parse=lambda: bring_back(last, os.path.join(a.out, "device-last.pth")), cwd=w)
        data_dir = os.path.abspath(a.data_dir)
        self.run("resume", [py, os.path.join(ROOT, "train.py"), "--resume", last, "--data-dir", data_dir],
                 partial, cwd=w)
        best = os.path.join(w, "ck", "device", "Sample_ResNet.pth")
        self.run("evaluate", [py, os.path.join(ROOT, "evaluate.py"), best, "--data-dir", data_dir, "--no-download",
                              "--device", a.device], partial)
        self.run("torchrun", [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                              *self.train_cmd("--epochs", "1", "--run-name", "torchrun")[1:]], partial, cwd=w)
        self.run("sync", self.pytest_cmd("-k", "cuda", "tests/test_engine.py"))
        bench, compiled = (os.path.join(w, "logs", name) for name in ("bench.json", "bench-compile.json"))
        if a.full_data:  # the one model's training throughput: how many epochs fit
            self.run("bench", self.bench_cmd(bench, "--skip-data", "--models", a.model, "--seed-models"),
                     parse=lambda: bench_row(read_json(bench)))
        else:
            self.run("bench", self.bench_cmd(bench, "--seed-models", SEED_SIDE_MODEL),
                     parse=lambda: bench_row(read_json(bench)))
        self.run("compile", self.bench_cmd(compiled, "--compile", "--skip-data", "--models",
                                           self.size["compile_model"], "--seed-models"),
                 parse=lambda: bench_row(read_json(compiled)))
        return self.rows


def finish(row, rc, stopped, parse=None):
    """A run check's status from its exit and, when it exited 0, from ``parse`` (-> dict of fields
    for the row, with 'problem' when the result is wrong). An unreadable result fails this check
    alone."""
    if stopped:
        row.update(ok=False, status=f"timed out ({stopped} at its {row['limit']} s limit)")
        return
    if rc != 0:
        row.update(ok=False, status=f"FAILED (exit {rc})")
        return
    try:
        fields = parse() if parse else {}
    except Exception as e:  # noqa: BLE001 -- a warning where JSON was expected, a missing file...
        fields = {"problem": f"result missing or unreadable ({type(e).__name__}: {' '.join(str(e).split())[:150]})"}
    problem = fields.pop("problem", None)
    row.update(fields, ok=problem is None, status="ok" if problem is None else f"FAILED: {problem}")


def parity_row(result):
    problem = parity_verdict(result)
    return {"max_diff": result, **({"problem": problem} if problem else {})}


def bench_row(result):
    """bench.py's rows in a line: how many were measured (the figures are in the report's tables)."""
    rows = result["rows"]
    failed = [f"{r['kind']} {r['model'] or ''}: {r['error']}" for r in rows if "error" in r]
    return {"summary": f"{len(rows) - len(failed)} rows measured" + (f"; failed: {failed[0]}" if failed else "")}


def bring_back(src, dest):
    """The stopped run's last.pth (small: sample_resnet), for the CPU to resume and evaluate."""
    tmp = dest + ".tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return {}


def versions(device):
    """GPU, driver, CUDA, cuDNN, torch, torchvision: what every figure depends on."""
    info = machine_info()
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        smi = None
    info.update(nvidia_smi=smi, torchvision=__import__("torchvision").__version__, device=device)
    return info


def versions_line(m):
    return (f"{m['gpu'] or 'no GPU'}; nvidia-smi {m['nvidia_smi'] or '-'}; CUDA {m['cuda']}, cuDNN {m['cudnn']}, "
            f"torch {m['torch']}, torchvision {m['torchvision']}, Python {m['python']}")


# ----------------------------------------------------------------------------------------------
# Pass 2: accuracy


def epochs_that_fit(model, bench_result, seconds, n_train):
    """Epochs of ``n_train`` images at the bench's training throughput that fit ``seconds``."""
    rates = {r["model"]: r["project_img_s"] for r in (bench_result or {}).get("rows", [])
             if r["kind"] == "train" and "error" not in r}
    if model not in rates:
        return FALLBACK_EPOCHS
    return max(1, min(MAX_EPOCHS, math.floor((seconds - RUN_OVERHEAD_S) * SAFETY * rates[model] / n_train)))


def pass2_models(args):
    if args.full_data:
        return [args.model]
    return ACCURACY_ORDER + (FROZEN_MODELS if args.weights else [])


def run_options(args, model, epochs):
    """train.py options of one accuracy run."""
    opts = {"image_size": SIZES["cpu"]["image_size"] if args.rehearse else 224, "epochs": epochs,
            "val_split": args.val_split, "val_every": 5, "train_subset": args.train_subset,
            "test_subset": args.test_subset, "weights": args.weights if args.weights and model != "sample_resnet"
            else "none"}
    return {k: v for k, v in opts.items() if v is not None}


def settings_line(opts, pool):
    train = opts.get("train_subset") or pool - opts["val_split"]
    return (f"{opts['image_size']} px, {opts['epochs']} ep, train {train:,}, val {opts['val_split']:,}, "
            f"test {opts.get('test_subset', 10000):,}" + (", random init" if opts["weights"] == "none" else ""))


def accuracy_runs(args, work, deadline, bench_result, publish):
    """Pass 2: each model's share of the time left; SIGINT so that its grace ends by ``deadline``."""
    models = pass2_models(args)
    n_train = args.train_subset or args.train_pool - args.val_split
    rows = []
    for i, model in enumerate(models):
        share = (deadline - time.time()) / (len(models) - i)
        if share < MIN_CHECK_S or (share < RUN_OVERHEAD_S and not args.rehearse):
            rows.append({"model": model, "status": "skipped: out of time"})
            continue
        opts = run_options(args, model, args.epochs or epochs_that_fit(model, bench_result, share, n_train))
        name = f"gpu-{model}"
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", model, "--run-name", name, "--overwrite",
               "--device", args.device, "--data-dir", args.data_dir, "--no-download", "--out",
               os.path.join(work, "ck"), "--log-dir", os.path.join(work, "logs")]
        cmd += [t for k, v in opts.items() for t in ("--" + k.replace("_", "-"), str(v))]
        print(f"gpu_check: {model}: {settings_line(opts, args.train_pool)} (share {share:.0f} s)", flush=True)
        log = os.path.join(work, "logs", f"{name}.out")
        rc, stopped, seconds = run_group(cmd, log, share, {"CIFAR10_PARTIAL": "1"})
        output = read_text(log)
        row = {"model": model, "settings": opts, "describe": settings_line(opts, args.train_pool), "returncode": rc,
               "wall_s": seconds, **read_run(os.path.join(work, "logs", name + ".csv"), output)}
        row["status"] = ("done" if rc == 0 and row["test_acc"] is not None else
                         f"stopped at the deadline after {row['epochs_done']} ep" if stopped else
                         f"failed: {last_line(output)}")
        rows.append(row)
        publish(rows)
    return rows


# ----------------------------------------------------------------------------------------------
# The report


def throughput_table(bench_result, compile_result, compile_model):
    rows = ["| model | train img/s | eval img/s | seed-style train img/s | project / seed |",
            "|---|---:|---:|---:|---:|"]
    by = {}
    for r in (bench_result or {}).get("rows", []):
        by.setdefault(r["model"], {})[r["kind"]] = r

    def cell(r, key):
        if r is None:
            return "not measured"
        return f"failed: {r['error']}" if "error" in r else f"{r[key]:,.0f}" if r.get(key) is not None else "-"
    for model in MODELS:
        tr, ev = by.get(model, {}).get("train"), by.get(model, {}).get("eval")
        ratio = f"{tr['ratio']:.2f}x" if tr and tr.get("ratio") else "-"
        seed = cell(tr, "seed_img_s") if tr and tr.get("seed_img_s") else "-"
        rows.append(f"| {model} | {cell(tr, 'project_img_s')} | {cell(ev, 'project_img_s')} | {seed} | {ratio} |")
    lines = rows + [""]
    data_row = by.get(None, {}).get("data")
    if data_row and "error" not in data_row:
        trains = [kinds["train"]["project_img_s"] for model, kinds in by.items()
                  if model and "train" in kinds and "error" not in kinds["train"]]
        fastest = max(trains) if trains else None
        lines.append(f"Data path: {data_row['project_img_s']:,.0f} img/s"
                     + (f", {data_row['project_img_s'] / fastest:.1f}x the fastest model's training "
                        f"({fastest:,.0f} img/s; target 3x)" if fastest else "") + ".")
    compiled = next((r for r in (compile_result or {}).get("rows", []) if r["kind"] == "train"), None)
    eager = by.get(compile_model, {}).get("train")
    if compiled and eager and "error" not in compiled and "error" not in eager:
        fast, slow = compiled["project_img_s"], eager["project_img_s"]
        lines.append(f"{compile_model} training: eager {slow:,.0f} img/s, torch.compile {fast:,.0f} img/s "
                     f"({fast / slow:.2f}x).")
    return "\n".join(lines) + "\n"


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def accuracy_table(rows):
    lines = ["| model | status | settings | best val acc | test acc | seed's test acc | train img/s | wall s |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['status'].replace('|', '/')} | {r.get('describe', '-')} | "
                     f"{fmt(r.get('best_val_acc'), '.4f')} | {fmt(r.get('test_acc'), '.4f')} | "
                     f"{SEED_TEST_ACC[r['model']]:.4f} | {fmt(r.get('train_img_s'), ',.0f')} | "
                     f"{fmt(r.get('wall_s'), '.0f')} |")
    return "\n".join(lines) + "\n"


def markdown(meta, checks, rows, bench_result, compile_result):
    m = meta["machine"]
    lines = ["| check | status | seconds | limit | result |", "|---|---|---:|---:|---|"]
    for c in checks:
        result = "; ".join(filter(None, [c["summary"], "max diff " + json.dumps(c["max_diff"]) if "max_diff" in c
                                         else ""]))
        lines.append(f"| {c['check']} | {c['status']} | {c['seconds']} | {c.get('limit', '-')} | "
                     f"{result.replace('|', '/')} |")
    cuda_side = ", bf16, channels_last" if m["cuda"] else ""
    return (f"# GPU check{' (rehearsal on the CPU)' if meta['rehearse'] else ''}\n\n"
            f"Machine: {machine_line(m)}; {versions_line(m)}. Date: {meta['date']}.\n\n"
            f"Command: `{meta['command']}`; budget {meta['budget']:.0f} s, so far {meta['wall_s']:.0f} s"
            f"{'' if meta.get('finished') else ' (still running, or cut off)'}.\n\n"
            "## Pass 1: checks\n\n" + "\n".join(lines) +
            f"\n\n## Throughput ({meta['image_size']} px{cuda_side})\n\n" +
            throughput_table(bench_result, compile_result, SIZES[m["device"]]["compile_model"]) +
            (f"\n{bench_result['markdown']}" if bench_result and bench_result.get("markdown") else "") +
            "\n## Pass 2: accuracy\n\n" + (accuracy_table(rows) if rows else "(not run)\n") +
            f"\nTraining data: {meta['data']}.\n")


def atomic_write(path, text):
    """Readers (and a call cut off mid-write) see the old file or the new one, never half of one."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def pack(logs, archive):
    """The logs as one archive (a device call brings back at most 8 files); checkpoints stay out."""
    with tarfile.open(archive + ".tmp", "w:gz") as tar:
        tar.add(logs, arcname="logs")
    os.replace(archive + ".tmp", archive)


def publish(out, base, work, meta, checks, rows):
    """The report (.md and .json) and logs.tar.gz at ``out``'s top level, rewritten whole."""
    bench_result = read_json(os.path.join(work, "logs", "bench.json"))
    compile_result = read_json(os.path.join(work, "logs", "bench-compile.json"))
    atomic_write(os.path.join(out, base + ".md"), markdown(meta, checks, rows, bench_result, compile_result))
    atomic_write(os.path.join(out, base + ".json"), json.dumps(
        {**meta, "checks": checks, "rows": rows, "bench": bench_result, "bench_compile": compile_result}, indent=2))
    pack(os.path.join(work, "logs"), os.path.join(out, "logs.tar.gz"))
    return os.path.join(out, base + ".md")


def report_base(info):
    """gpu-<time>-<gpu or cpu>: fixed for the whole call, so rewrites replace the same files."""
    name = re.sub(r"[^a-z0-9]+", "-", (info["gpu"] or "cpu").lower()).strip("-")[:40]
    return f"gpu-{time.strftime('%Y%m%d-%H%M%S')}-{name}"


# ----------------------------------------------------------------------------------------------
# The script


def deadlines(args, start):
    """(end of pass 1, end of pass 2): pass 2 gets what --budget leaves after pass 1's share, when
    that is at least PASS2_MIN_S; --full-data's pass 1 is the versions and one model's bench."""
    end = start + args.budget - PACK_S
    if args.full_data:
        return start + FULL_DATA_BENCH_S, end
    share = SIZES[args.device]["first_pass_s"]
    if args.first_pass_only or args.budget - PACK_S - share < PASS2_MIN_S:
        return end, None
    return start + share, end


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.parity_json:
        atomic_write(args.parity_json, json.dumps(parity(args.device)))
        return 0
    start = time.time()
    first_end, end = deadlines(args, start)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu-check-")  # outside --out: only the report and a tarball go there
    os.makedirs(os.path.join(work, "logs"))
    info = versions(args.device)
    atomic_write(os.path.join(work, "logs", "versions.json"), json.dumps(info, indent=2))
    print(f"gpu_check: {machine_line(info)}; {versions_line(info)}; work folder {work}", flush=True)
    meta = {"command": "python benchmarks/gpu_check.py " + shlex.join(argv), "machine": info, "budget": args.budget,
            "rehearse": args.rehearse, "image_size": SIZES[args.device]["image_size"],
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "data": f"{args.data_dir} with CIFAR10_PARTIAL=1: {args.train_pool:,} training images "
                    f"({args.val_split:,} held out for validation) + test_batch.bin"}
    base, state = report_base(info), {"rows": []}

    def report(rows=None):
        state["rows"] = rows if rows is not None else state["rows"]
        meta["wall_s"] = round(time.time() - start, 1)
        return publish(args.out, base, work, meta, checks.rows, state["rows"])

    checks = Checks(args, work, first_end, report)
    try:
        checks.all(info)
        if end is not None and not args.first_pass_only:
            accuracy_runs(args, work, end, read_json(os.path.join(work, "logs", "bench.json")), report)
        meta["finished"] = True
        path = report()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + read_text(path))
    print(f"gpu_check: {time.time() - start:.0f} s in all; written: {path} (and .json), {args.out}/logs.tar.gz")
    failed = ([c for c in checks.rows if c["ok"] is False]
              + [r for r in state["rows"] if r["status"].startswith("failed")])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
