"""Everything a lent GPU should tell us, in an order that cannot waste it (README, "Speed").

    python3 benchmarks/gpu_check.py --data-dir cifar --out $OUT          # on the device machine
    python benchmarks/gpu_check.py --rehearse --data-dir ../shared/data  # the whole script on the CPU, < 5 min

Pass 1 (at most FIRST_PASS_S, always leaves a report): versions; the CPU test subset on the
device's torch; CUDA-vs-CPU parity of the batched augmentation; every model's training and
evaluation throughput at 224 px (bf16, channels_last; the seed-style loop for one model);
eager vs torch.compile for one model; a torchrun single-process run; stop, resume and evaluate on
the device, with that small checkpoint copied to the output so the CPU side can resume and
evaluate it. Each check runs in its own process under its own time limit; the report is rewritten
after each, so a cut-off call still brings back what was done.

Pass 2 (the time left of --budget): real-data accuracy runs on the carried files (data_batch_1.bin
and test_batch.bin fit one call; see benchmarks/stage_data.py for the whole set), fine-tuned
models first, each with the epochs its measured throughput fits.

Written under --out (a device call brings back at most 8 files): gpu-<date>-<gpu>.md and .json,
logs.tar.gz (every check's and run's output, CSVs, curves) and device-last.pth (the checkpoint of
the stop/resume check).
"""
import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import reproduce  # noqa: E402
from bench import machine_info, machine_line  # noqa: E402

BUDGET_S = 480  # the whole script: a 10-minute call keeps room for start-up and copying back
FIRST_PASS_S = 240  # pass 1, at most
MODELS = ["sample_resnet", "resnet", "resnet_att", "resnet_scratch", "resnet_att_scratch"]
ACCURACY_ORDER = ["resnet_att_scratch", "resnet_scratch", "sample_resnet"]  # fine-tuned first: no CPU figure
PRETRAINED_MODELS = ["resnet_att", "resnet"]  # only with --weights (the file must be staged first)
COMPILE_MODEL = "resnet_scratch"
SEED_SIDE_MODEL = "resnet_scratch"
TRAIN_POOL = 10_000  # data_batch_1.bin
VAL_SPLIT = 1000
FALLBACK_EPOCHS = 5  # when the bench measured nothing for a model (the deadline still applies)
RUN_OVERHEAD_S = 30  # per train.py run: start-up, data, cuDNN autotuning, validation, test at 224 px
SAFETY = 0.7  # of bench's step throughput for train.py's epochs (logging, validation)
MAX_EPOCHS = 30

# Pass 1 per device: (image size, bench options, the tiny train.py run's options)
SIZES = {
    "cuda": dict(image_size=224, bench="--steps 10 --warmup 3 --min-seconds 1", compile_model=COMPILE_MODEL,
                 tiny="--image-size 64 --train-subset 1024 --batch-size 128"),
    # the rehearsal compiles the small model: inductor needs minutes for ResNet-50 on two CPU cores
    "cpu": dict(image_size=32, bench="--batch-size 8 --steps 1 --warmup 1 --min-seconds 0 --workers 1",
                compile_model="sample_resnet", tiny="--image-size 32 --train-subset 128 --batch-size 32"),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--rehearse", action="store_true",
                   help="the whole script on the CPU at tiny sizes (< 5 min): --device cpu, 32 px, tiny runs")
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_ROOT", "cifar"))
    p.add_argument("--weights", help="ImageNet ResNet-50 file: also train resnet and resnet_att from it")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "results", time.strftime("gpu-check-%Y%m%d-%H%M%S")),
                   help="default: $OUT if set, else results/gpu-check-<time>")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole script")
    p.add_argument("--first-pass-only", action="store_true", help="stop after pass 1")
    p.add_argument("--full-data", action="store_true",
                   help="pass 2 at the seed's scale: all 50,000 training images staged (stage_data.py), 5,000 "
                        "for validation, 10 epochs unless --epochs")
    p.add_argument("--epochs", type=int, help="pass 2, per model (default: as many as fit the budget)")
    p.add_argument("--train-subset", type=int, help="pass 2 (default: all that the validation split leaves)")
    p.add_argument("--test-subset", type=int, help="pass 2 (default: all 10,000)")
    p.add_argument("--parity", action="store_true", help=argparse.SUPPRESS)  # internal: one check's process
    args = p.parse_args(argv)
    args.train_pool, args.val_split = (50_000, 5000) if args.full_data else (TRAIN_POOL, VAL_SPLIT)
    if args.full_data and not args.epochs:
        args.epochs = 10
    if args.rehearse:
        args.device = "cpu"
        args.epochs = args.epochs or 1
        args.train_subset = args.train_subset or 256
        args.test_subset = args.test_subset or 128
    return args


# ----------------------------------------------------------------------------------------------
# Running checks


def run_logged(cmd, log_path, timeout, env=None):
    """A command's output to ``log_path`` (and the console); killed after ``timeout`` seconds.
    -> (return code or 'timeout', seconds, last line)."""
    print("$ " + shlex.join(cmd), flush=True)
    start = time.time()
    with open(log_path, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=max(timeout, 1),
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    with open(log_path) as f:
        text = f.read()
    print(text[-3000:], flush=True)
    last = next((ln for ln in reversed(text.strip().splitlines()) if ln.strip()), "")
    return rc, round(time.time() - start, 1), last[:300]


def parity(device):
    """Max difference between the batched augmentation on ``device`` and on the CPU, same draws."""
    import numpy as np
    import data
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 64)
    out = {}
    for train in (True, False):
        a = [b.cpu() for b, _ in data.TensorLoader(x, y, 32, 224, train, device, seed=1)]
        b = [b for b, _ in data.TensorLoader(x, y, 32, 224, train, "cpu", seed=1)]
        out["train" if train else "eval"] = max((p - q).abs().max().item() for p, q in zip(a, b))
    return out


class Checks:
    """Pass 1: each check in its own process and time limit; the report after each."""

    def __init__(self, args, work, deadline, report):
        self.args, self.work, self.deadline, self.report = args, work, deadline, report
        self.size = SIZES[args.device]
        self.rows = []

    def left(self):
        return self.deadline - time.time()

    def run(self, name, cmd, limit, env=None, parse=None):
        if self.left() < 5:
            self.rows.append({"check": name, "ok": False, "seconds": 0, "summary": "skipped: pass 1 out of time"})
        else:
            rc, seconds, last = run_logged(cmd, os.path.join(self.work, f"{name}.log"), min(limit, self.left()), env)
            row = {"check": name, "ok": rc == 0, "returncode": rc, "seconds": seconds, "summary": last}
            if parse and rc == 0:
                row.update(parse())
            self.rows.append(row)
        self.report()
        return self.rows[-1]

    def train_cmd(self, *argv):
        a = self.args
        return [sys.executable, os.path.join(ROOT, "train.py"), "--model", "sample_resnet", "--device", a.device,
                "--data-dir", a.data_dir, "--no-download", "--val-split", "100", "--test-subset", "200",
                "--out", os.path.join(self.work, "ck"), "--log-dir", os.path.join(self.work, "log"),
                *shlex.split(self.size["tiny"]), *argv]

    def all(self):
        a, py = self.args, sys.executable
        env = {"CIFAR10_PARTIAL": "1"}
        self.run("tests", [py, "-m", "pytest", "-q", "-m", "not slow", "-x", "-p", "no:cacheprovider",
                           "tests/test_engine.py", "tests/test_models.py"], 60)
        self.run("parity", [py, __file__, "--parity", "--device", a.device], 30,
                 parse=lambda: {"max_diff": json.loads(open(os.path.join(self.work, "parity.log")).read()
                                                       .strip().splitlines()[-1])})
        bench_json = os.path.join(self.work, "bench.json")
        self.run("bench", [py, os.path.join(HERE, "bench.py"), "--device", a.device, "--json", bench_json,
                           "--image-size", str(self.size["image_size"]), "--seed-models", SEED_SIDE_MODEL,
                           *shlex.split(self.size["bench"])], 110)
        compile_json = os.path.join(self.work, "bench-compile.json")
        self.run("compile", [py, os.path.join(HERE, "bench.py"), "--device", a.device, "--json", compile_json,
                             "--compile", "--skip-data", "--models", self.size["compile_model"], "--seed-models",
                             "--image-size", str(self.size["image_size"]), *shlex.split(self.size["bench"])], 90)
        self.run("torchrun", [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                              *self.train_cmd("--epochs", "1", "--run-name", "torchrun")[1:]], 60, env)
        self.run("stop", self.train_cmd("--epochs", "2", "--stop-after", "1", "--run-name", "device"), 45, env)
        last = os.path.join(self.work, "ck", "device", "last.pth")
        self.run("resume", [py, os.path.join(ROOT, "train.py"), "--resume", last, "--data-dir", a.data_dir], 45, env)
        best = os.path.join(self.work, "ck", "device", "Sample_ResNet.pth")
        self.run("evaluate", [py, os.path.join(ROOT, "evaluate.py"), best, "--data-dir", a.data_dir,
                              "--no-download", "--device", a.device], 30, env)
        if os.path.exists(last):  # small (sample_resnet): the CPU side resumes and evaluates it
            shutil.copy(last, os.path.join(a.out, "device-last.pth"))
        return self.rows


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# Pass 2: accuracy


def epochs_that_fit(model, bench_result, seconds, n_train):
    """Epochs of ``n_train`` images at the bench's training throughput that fit ``seconds``."""
    rates = {r["model"]: r["project_img_s"] for r in (bench_result or {}).get("rows", [])
             if r["kind"] == "train" and "error" not in r}
    if model not in rates:
        return FALLBACK_EPOCHS
    return max(1, min(MAX_EPOCHS, math.floor((seconds - RUN_OVERHEAD_S) * SAFETY * rates[model] / n_train)))


def accuracy_runs(args, work, deadline, bench_result, report):
    models = ACCURACY_ORDER + (PRETRAINED_MODELS if args.weights else [])
    n_train = args.train_subset or args.train_pool - args.val_split
    checkpoints = tempfile.mkdtemp(prefix="gpu-check-ckpt-")  # hundreds of MB: they do not come back
    common = {"data_dir": args.data_dir, "device": args.device, "log_dir": work, "out": checkpoints}
    rows = []
    for i, model in enumerate(models):
        share = (deadline - time.time()) / (len(models) - i)
        if share < RUN_OVERHEAD_S and not args.rehearse:
            break
        opts = {"image_size": SIZES[args.device]["image_size"] if args.rehearse else 224, "val_split": args.val_split,
                "val_every": 5, "train_subset": args.train_subset, "test_subset": args.test_subset,
                "weights": args.weights if model in PRETRAINED_MODELS else "none",
                "epochs": args.epochs or epochs_that_fit(model, bench_result, share, n_train)}
        opts = {k: v for k, v in opts.items() if v is not None}
        print(f"gpu_check: {model}: {reproduce.describe(opts, args.train_pool)} (share {share:.0f} s)", flush=True)
        rows.append(reproduce.run_model(model, opts, common, {"tag": "gpu", "log": work},
                                        time.strftime("%Y%m%d-%H%M%S"), deadline=deadline,
                                        env={"CIFAR10_PARTIAL": "1"}))
        report(rows)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return rows


# ----------------------------------------------------------------------------------------------
# The report


def versions(device):
    """GPU, driver, CUDA, cuDNN, torch: what the figures depend on."""
    info = machine_info()
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        smi = None
    info.update(nvidia_smi=smi, torchvision=__import__("torchvision").__version__, device=device)
    return info


def throughput_table(bench_result, compile_result, compile_model):
    rows = ["| model | train img/s | eval img/s | seed-style train img/s | project / seed |", "|---|---:|---:|---:|---:|"]
    by = {}
    for r in (bench_result or {}).get("rows", []):
        by.setdefault(r["model"], {})[r["kind"]] = r
    for model in MODELS:
        tr, ev = by.get(model, {}).get("train"), by.get(model, {}).get("eval")
        cell = lambda r, k: "not measured" if r is None else (f"failed: {r['error']}" if "error" in r else
                                                               f"{r[k]:,.0f}" if r.get(k) is not None else "-")
        ratio = f"{tr['ratio']:.2f}x" if tr and tr.get("ratio") else "-"
        rows.append(f"| {model} | {cell(tr, 'project_img_s')} | {cell(ev, 'project_img_s')} | "
                    f"{cell(tr, 'seed_img_s') if tr and tr.get('seed_img_s') else '-'} | {ratio} |")
    data_row = by.get(None, {}).get("data")
    lines = rows + [""]
    if data_row and "error" not in data_row:
        trains = [r["project_img_s"] for m, k in by.items() if m for r in [k.get("train")] if r and "error" not in r]
        fastest = max(trains) if trains else None
        lines.append(f"Data path: {data_row['project_img_s']:,.0f} img/s"
                     + (f", {data_row['project_img_s'] / fastest:.1f}x the fastest model's training "
                        f"({fastest:,.0f} img/s; target 3x)" if fastest else "") + ".")
    compiled = next((r for r in (compile_result or {}).get("rows", []) if r["kind"] == "train"), None)
    eager = by.get(compile_model, {}).get("train")
    if compiled and eager and "error" not in compiled and "error" not in eager:
        lines.append(f"{compile_model} training: eager {eager['project_img_s']:,.0f} img/s, torch.compile "
                     f"{compiled['project_img_s']:,.0f} img/s ({compiled['project_img_s'] / eager['project_img_s']:.2f}x).")
    return "\n".join(lines) + "\n"


def write_report(meta, checks, rows, out_dir, work):
    base = reproduce.output_base(out_dir, "gpu", meta["machine"])
    m = meta["machine"]
    bench_result = read_json(os.path.join(work, "bench.json"))
    compile_result = read_json(os.path.join(work, "bench-compile.json"))
    check_lines = ["| check | result | seconds | summary |", "|---|---|---:|---|"]
    for c in checks:
        extra = f" max diff {c['max_diff']}" if "max_diff" in c else ""
        check_lines.append(f"| {c['check']} | {'ok' if c['ok'] else 'FAILED'} | {c['seconds']} | "
                           f"{c['summary'].replace('|', '/')}{extra} |")
    text = (f"# GPU check{' (rehearsal on the CPU)' if meta['rehearse'] else ''}\n\n"
            f"Machine: {machine_line(m)}; nvidia-smi `{m['nvidia_smi']}`; CUDA {m['cuda']}, cuDNN {m['cudnn']}, "
            f"torch {m['torch']}, torchvision {m['torchvision']}, Python {m['python']}. Date: {meta['date']}.\n\n"
            f"Command: `{meta['command']}`\n\n## Pass 1: checks\n\n" + "\n".join(check_lines) +
            f"\n\n## Throughput ({meta['image_size']} px{', bf16, channels_last' if m['cuda'] else ''})\n\n" +
            throughput_table(bench_result, compile_result, SIZES[m["device"]]["compile_model"]) +
            (f"\n{bench_result['markdown']}" if bench_result else "") +
            "\n## Pass 2: accuracy\n\n" + (reproduce.markdown(rows, meta) if rows else "(not run)\n") +
            f"\nTraining data: {meta['data']}. Whole script: {meta.get('total_wall_s', 0):.0f} s.\n")
    with open(base + ".md", "w") as f:
        f.write(text)
    with open(base + ".json", "w") as f:
        json.dump({**meta, "checks": checks, "rows": rows, "bench": bench_result, "bench_compile": compile_result},
                  f, indent=2)
    return base + ".md"


def pack(folder, archive):
    """One archive instead of a dozen files (a device call returns at most 8)."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=os.path.basename(folder))
    shutil.rmtree(folder)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.parity:
        print(json.dumps(parity(args.device)))
        return 0
    start = time.time()
    deadline = start + args.budget
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(args.out, "logs")  # packed into logs.tar.gz at the end: few files come back
    os.makedirs(work, exist_ok=True)
    info = versions(args.device)
    with open(os.path.join(work, "versions.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(f"gpu_check: {machine_line(info)}; nvidia-smi: {info['nvidia_smi']}", flush=True)
    meta = {"preset": "gpu", "command": "python benchmarks/gpu_check.py " + shlex.join(argv), "machine": info,
            "rehearse": args.rehearse, "image_size": SIZES[args.device]["image_size"],
            "weights": f"none (random); {args.weights} for resnet, resnet_att" if args.weights else "none (random)",
            "train_pool": args.train_pool, "date": time.strftime("%Y-%m-%d %H:%M"),
            "data": f"{args.data_dir} with CIFAR10_PARTIAL=1 (data_batch_1.bin when only it is carried: 10,000 "
                    f"training images, {VAL_SPLIT:,} held out for validation) + test_batch.bin"}
    state = {"checks": [], "rows": []}

    def report(rows=None):
        state["rows"] = rows if rows is not None else state["rows"]
        meta["total_wall_s"] = round(time.time() - start, 1)
        return write_report(meta, state["checks"], state["rows"], args.out, work)

    checks = Checks(args, work, start + min(FIRST_PASS_S, args.budget), report)
    state["checks"] = checks.rows
    checks.all()
    if not args.first_pass_only:
        accuracy_runs(args, work, deadline, read_json(os.path.join(work, "bench.json")), report)
    path = report()
    pack(work, os.path.join(args.out, "logs.tar.gz"))
    print("\n" + open(path).read())
    print(f"gpu_check: {time.time() - start:.0f} s in all; written: {path} (and .json), {args.out}/logs.tar.gz")
    return 1 if any(not c["ok"] for c in checks.rows) or any(r["returncode"] for r in state["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
