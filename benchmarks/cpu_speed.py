"""The settings of a long CPU run, measured side by side: for each model, the training step at the
global batch 128 in float32 and bf16 autocast, whole or in micro-batches, eager and compiled, with
its steady images/s and the process's peak memory (RSS). Picks, per model, the fastest setting
that keeps the peak under --memory-share of the machine's memory (about a third: a long run must
leave room for the tests and tools of a working session beside it).

    python benchmarks/cpu_speed.py --json results/speed-cpu.json     # 224 px: ~15 min on two cores
    python benchmarks/cpu_speed.py --image-size 32 --steps 1 --models sample_resnet   # the plumbing

Each setting runs in its own process (a clean peak RSS, and compile caches that do not carry over):
train.py's step itself (engine.train_step with --micro-batch, channels_last, the tuned allocator,
batches from data.TensorLoader's augmentation at the chosen size), random weights.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = ["sample_resnet", "resnet_scratch", "resnet_att_scratch"]  # the models a CPU run trains on images
BATCH = 128  # train.py's global batch
MICRO = [None, 64, 32]  # None: the whole batch at once
PRECISIONS = ["fp32", "bf16"]

CHILD = r"""
import contextlib, json, os, resource, sys, time
sys.path.insert(0, {root!r})
from utils import tune_cpu_allocator
tune_cpu_allocator()
import numpy as np, torch
import data, engine
from models import build_model
cfg = json.loads(sys.argv[1])
torch.manual_seed(0)
model, _ = build_model(cfg["model"], weights="none")
model.to(memory_format=torch.channels_last)
params = [p for p in model.parameters() if p.requires_grad]
opt = engine.make_optimizer("sgd", 0.01, 5e-4, params)
sched = engine.make_scheduler(opt, 100, 1)
crit = torch.nn.CrossEntropyLoss()
autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg["precision"] == "bf16" else contextlib.nullcontext()
n = cfg["batch"] * (cfg["warmup"] + cfg["steps"])
rng = np.random.default_rng(0)
loader = data.TensorLoader(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n),
                           cfg["batch"], cfg["image_size"], True, "cpu", channels_last=True)
net = torch.compile(model) if cfg["compile"] else model
meter = engine.Meter("cpu")
times, start = [], time.time()
for i, (x, y) in enumerate(loader):
    t = time.time()
    loss = engine.train_step(net, x, y, crit, opt, sched, autocast, meter, cfg["micro"])
    float(loss)  # the step's end
    times.append(time.time() - t)
steady = times[cfg["warmup"]:]
print(json.dumps({{"img_s": cfg["batch"] * len(steady) / sum(steady), "first_step_s": times[0],
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=2, help="timed steps per setting (each of --batch images)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (a compiled step: its compilation)")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--precisions", nargs="+", default=PRECISIONS, choices=PRECISIONS)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    p.add_argument("--memory-share", type=float, default=1 / 3, help="of the machine's memory, for the pick")
    p.add_argument("--timeout", type=float, default=900, help="seconds per setting")
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


def measure(cfg, timeout):
    """One setting in a fresh process -> its figures, or {"error": ...}."""
    try:
        res = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT), json.dumps(cfg)], capture_output=True,
                             text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if res.returncode:
        lines = (res.stderr or res.stdout).strip().splitlines()
        return {"error": lines[-1][:200] if lines else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def machine_memory_gb():
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def settings(args, model):
    """Eager: every precision x micro-batch. Compiled: see ``compiled_settings``, measured after."""
    return [dict(model=model, precision=p, micro=m, compile=False) for p in args.precisions for m in MICRO
            if m is None or m < args.batch]


def pick(rows, limit_gb):
    ok = [r for r in rows if "error" not in r and r["peak_rss_gb"] <= limit_gb]
    return max(ok, key=lambda r: r["img_s"]) if ok else None


def compiled_settings(rows, limit_gb):
    """What to compile for one model, given its eager rows: the fastest eager setting that fits, and the
    whole batch of the same precision when that is another one that fits. The whole batch is one graph
    with no accumulation loop, and compiled it was sample_resnet's fastest step on the Dec-02 Xeon (61 img/s
    against the best eager 48) while eager it was not the fastest: compiling the eager winner alone
    missed the setting `--preset seed-cpu` trains sample_resnet with."""
    best = pick(rows, limit_gb)
    if best is None:
        return []
    keep = [best]
    if best["micro"] is not None:
        whole = pick([r for r in rows if r["precision"] == best["precision"] and r["micro"] is None], limit_gb)
        keep += [whole] if whole else []
    return [{k: r[k] for k in ("model", "precision", "micro")} | {"compile": True} for r in keep]


def label(r):
    micro = f"micro {r['micro']}" if r["micro"] else f"whole {r['batch']}"
    return f"{r['precision']}, {micro}, {'compiled' if r['compile'] else 'eager'}"


def table(rows, picks, limit_gb, meta):
    from report import machine_line
    lines = [f"Machine: {machine_line(meta['machine'])}; {meta['memory_gb']:.0f} GB; {meta['date']}.",
             f"Training step at {meta['image_size']} px, global batch {meta['batch']}, channels_last, random weights; "
             f"{meta['steps']} timed step(s) after {meta['warmup']} warm-up. Peak RSS: the whole process.", "",
             "| model | setting | img/s | vs fp32 whole eager | peak RSS | first step (compile) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        base = next((b for b in rows if b["model"] == r["model"] and b["precision"] == "fp32" and not b["micro"]
                     and not b["compile"] and "error" not in b), None)
        if "error" in r:
            lines.append(f"| {r['model']} | {label(r)} | failed: {r['error']} | | | |")
            continue
        ratio = f"{r['img_s'] / base['img_s']:.2f}×" if base else "-"
        lines.append(f"| {r['model']} | {label(r)} | {r['img_s']:.1f} | {ratio} | {r['peak_rss_gb']:.1f} GB | "
                     f"{r['first_step_s']:.0f} s |")
    lines += ["", f"Fastest setting under {limit_gb:.1f} GB (the pick for a long run):", ""]
    lines += [f"- {m}: {label(p)}, {p['img_s']:.1f} img/s, {p['peak_rss_gb']:.1f} GB" if p else f"- {m}: none fits"
              for m, p in picks.items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from report import machine_info
    limit = machine_memory_gb() * args.memory_share
    common = dict(image_size=args.image_size, batch=args.batch, steps=args.steps, warmup=args.warmup)
    rows, picks = [], {}

    def measure_and_show(setting, progress=""):
        cfg = {**common, **setting}
        print(f"cpu_speed: {setting['model']} {label(cfg)}{progress}", flush=True)
        rows.append({**cfg, **measure(cfg, args.timeout)})
        print(f"  {json.dumps({k: v for k, v in rows[-1].items() if k not in common and k != 'model'})}", flush=True)

    for model in args.models:
        todo = settings(args, model)
        for i, s in enumerate(todo):
            measure_and_show(s, f" ({i + 1}/{len(todo)})")
        for s in [] if args.no_compile else compiled_settings([r for r in rows if r["model"] == model], limit):
            measure_and_show(s)
        picks[model] = pick([r for r in rows if r["model"] == model], limit)
    meta = {"machine": machine_info(), "memory_gb": machine_memory_gb(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": "python benchmarks/cpu_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            **common}
    text = table(rows, picks, limit, meta)
    print("\n" + text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, "rows": rows, "picks": picks, "memory_limit_gb": limit}, f, indent=2)
        with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
            f.write(f"# CPU training settings\n\n```\n{meta['command']}\n```\n\n{text}")
    return 0 if all(picks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
