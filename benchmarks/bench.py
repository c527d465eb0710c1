"""Side-by-side throughput on this machine: the project's data path, training step and evaluation
against the seed's (torchvision PIL transforms in a DataLoader, float32, every step through autograd).

    python benchmarks/bench.py                              # CPU defaults: a few minutes on two cores
    python benchmarks/bench.py --device cuda --json bench.json   # the full settings: 224 px, batch 256
    python benchmarks/bench.py --models sample_resnet resnet --skip-data

Every row runs both sides in this process, one after the other, on the same cores with the same
batch and image size, and reports images/s after warm-up (DataLoader worker start-up is reported
separately). Images are random uint8: neither path's cost depends on the pixel values.

Rows
  data   normalised batches of the seed's flip + RandomResizedCrop(0.8-1) augmentation:
         data.TensorLoader (batched matmuls on the device) vs data.PILLoader (--workers processes)
  train  one training step, models from random weights: the project's step (engine.train_step
         on TensorLoader batches; a frozen backbone runs without autograd in eval mode; on CUDA bf16
         autocast, channels_last, cudnn.benchmark, fused optimizer, optional --compile) vs a plain
         seed-style loop (float32, NCHW, PIL DataLoader, the whole model in train mode)
  eval   inference: engine.evaluate (inference_mode, batch x2, bf16/channels_last on CUDA) vs a
         seed-style torch.no_grad() loop on the PIL DataLoader
"""
import argparse
import contextlib
import functools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# On a CPU that other jobs share, OpenMP threads spinning at every barrier made small ops up to 8x
# slower here (and the figures erratic); sleeping instead costs nothing measurable on an idle machine.
# It must be set before torch loads OpenMP. Both sides of every row run under the same policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import data  # noqa: E402
import engine  # noqa: E402
from models import MODELS, build_model  # noqa: E402
from report import machine_info, machine_line  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Settings. The data rows always use the seed's 224 px (that is where PIL is slow). On two CPU cores
# a ResNet-50 step at 224 takes ~10 s, so the CPU training/eval rows run at 64 px, batch 32, to
# finish in minutes; CUDA runs the seed's 224 px with a GPU-sized batch.
SETTINGS = {
    "cpu": dict(data_size=224, data_batch=256, image_size=64, batch_size=32, warmup=1, steps=3),
    "cuda": dict(data_size=224, data_batch=256, image_size=224, batch_size=256, warmup=5, steps=20),
}
MIN_SECONDS = 2.0  # each side of a row times at least --steps batches AND at least this long
POOL = 20_000  # synthetic images per loader: enough batches for any timed window, 60 MB of uint8
SEED = 0
NOISE = 0.05  # a ratio this close under a target is reported as 'within noise', not as met


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--image-size", type=int, help="every row (default: data 224, train/eval per device)")
    p.add_argument("--batch-size", type=int, help="every row (default: data 256, train/eval per device)")
    p.add_argument("--steps", type=int, help="timed batches per side, at least (default per device)")
    p.add_argument("--warmup", type=int, help="untimed batches first (default per device)")
    p.add_argument("--min-seconds", type=float, default=MIN_SECONDS, help="timed seconds per side, at least")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="DataLoader workers of the seed's PIL path (default: the CPU cores)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seed-models", nargs="*", choices=list(MODELS),
                   help="models whose seed-style side is measured too (default: all of --models)")
    p.add_argument("--threads", type=int, help="torch threads of this process (default: torch's, the cores)")
    p.add_argument("--compile", action="store_true", help="torch.compile the project's training step")
    p.add_argument("--skip-data", action="store_true")
    p.add_argument("--skip-train", action="store_true", help="skip the training and evaluation rows")
    p.add_argument("--json", metavar="PATH", help="write the rows and the machine here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def settings(args):
    """The per-device defaults, overridden by whatever was given on the command line."""
    s = dict(SETTINGS[args.device])
    if args.image_size:
        s["data_size"] = s["image_size"] = args.image_size
    if args.batch_size:
        s["data_batch"] = s["batch_size"] = args.batch_size
    for key in ("steps", "warmup"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    s.update(workers=args.workers, min_seconds=args.min_seconds, compile=args.compile)
    return s


# ----------------------------------------------------------------------------------------------
# Timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(batches, device, warmup, steps, min_seconds, clock, multiple_of=1):
    """Yield ``warmup`` batches untimed, then batches until at least ``steps`` and ``min_seconds``
    have passed (and the count is a multiple of ``multiple_of``); the consumer's work on each batch
    happens between two yields, so the clock covers data and step. Results go into ``clock``."""
    it = iter(batches)
    t0 = time.perf_counter()
    for _ in range(warmup):
        yield next(it)
    sync(device)
    start = time.perf_counter()
    images = count = 0
    full = None
    while count < steps or time.perf_counter() - start < min_seconds or count % multiple_of:
        try:
            batch = next(it)
        except StopIteration:  # the pool ran out: report what was timed
            break
        full = full or len(batch[1])
        if len(batch[1]) != full:  # a last partial batch: a new shape, which cuDNN would autotune
            break
        yield batch
        images, count = images + len(batch[1]), count + 1
    sync(device)
    seconds = time.perf_counter() - start
    clock.update(img_s=images / seconds, images=images, batches=count, seconds=round(seconds, 3),
                 warmup_s=round(start - t0, 3))


def measure(consume, batches, device, s, multiple_of=1):
    """Run ``consume`` over timed batches -> {'img_s', 'images', 'batches', 'seconds', 'warmup_s'}.
    A DataLoader prepares ``prefetch_factor`` batches per worker ahead: those made during the
    warm-up would come for free in the timed window, so they are warm-up too."""
    clock = {}
    ahead = getattr(batches, "num_workers", 0) * (getattr(batches, "prefetch_factor", None) or 0)
    consume(timed(batches, device, s["warmup"] + ahead, s["steps"], s["min_seconds"], clock, multiple_of))
    return clock


def backend_flags(project):
    """The project's cuDNN/TF32 settings (as train.main sets them) or PyTorch's defaults (the seed's)."""
    torch.backends.cudnn.benchmark = project
    torch.backends.cuda.matmul.allow_tf32 = project
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default as well


# ----------------------------------------------------------------------------------------------
# Loaders over synthetic images


@functools.lru_cache(maxsize=1)
def pool(n):
    g = np.random.default_rng(SEED)
    return g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), g.integers(0, 10, n).astype(np.int64)


def project_loader(images, labels, size, batch, device, train_mode):
    return data.TensorLoader(images, labels, batch, size, train_mode, device, SEED, augment=True,
                             channels_last=True)  # as train.py: faster on the GPU and the CPU


def seed_loader(images, labels, s, size, batch, train_mode):
    return data.PILLoader(images, labels, batch, size, train_mode, s["workers"], SEED, augment=True)


def drain(device):
    def consume(batches):
        for x, y in batches:
            x.to(device)  # the seed's batches still have to reach the device; a no-op for the project's
    return consume


def bench_data(s, device):
    images, labels = pool(POOL)
    size, batch = s["data_size"], s["data_batch"]
    project = measure(drain(device), project_loader(images, labels, size, batch, device, True), device, s)
    # warm up one batch per worker (their start-up) and time whole rounds of workers: each worker
    # delivers a batch per round, so a partial round would count batches still in flight
    rounds = max(s["workers"], 1)
    seed = side(lambda: measure(drain(device), seed_loader(images, labels, s, size, batch, True), device, s, rounds))
    return row("data", None, size, batch, project, seed)


# ----------------------------------------------------------------------------------------------
# Training and evaluation


def make_optimizer(name, params, cuda):
    """train.py's per-model optimiser (engine.MODEL_DEFAULTS)."""
    d = engine.MODEL_DEFAULTS[name]
    return engine.make_optimizer(d["optimizer"], d["lr"], d["weight_decay"], params, fused=cuda)


def fresh_model(name, device, channels_last):
    torch.manual_seed(SEED)  # both sides start from the same random weights
    model, _ = build_model(name, weights="none")
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def project_train(name, images, labels, s, device):
    """What train.py does per step, through engine.train_step itself."""
    cuda = device.type == "cuda"
    backend_flags(True)
    model = fresh_model(name, device, True)
    net = torch.compile(model) if s["compile"] else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(name, params, cuda)
    loader = project_loader(images, labels, s["image_size"], s["batch_size"], device, True)
    scheduler = engine.make_scheduler(optimizer, len(loader), 1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    criterion, meter = nn.CrossEntropyLoss(), engine.Meter(device)

    def consume(batches):
        net.train()
        for x, y in batches:
            engine.train_step(net, x.to(device), y.to(device), criterion, optimizer, scheduler, autocast, meter)
        meter.read()  # the host reads the sums once, as train.py does at its check points
    return measure(consume, loader, device, s)


def seed_train(name, images, labels, s, device):
    """A plain loop as the seed's: float32, NCHW, every module in train mode (a frozen backbone's
    BatchNorm too), autograd on, the optimiser over the trainable parameters."""
    backend_flags(False)
    model = fresh_model(name, device, False)
    nn.Module.train(model)  # bypass ResNet50Classifier.train, which keeps a frozen backbone in eval
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(name, params, cuda=False)

    def consume(batches):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()
    return measure(consume, seed_loader(images, labels, s, s["image_size"], s["batch_size"], True), device, s)


def project_eval(name, images, labels, s, device):
    cuda = device.type == "cuda"
    backend_flags(True)
    model = fresh_model(name, device, True).eval()
    batch = s["batch_size"] * engine.EVAL_BATCH_FACTOR
    loader = project_loader(images, labels, s["image_size"], batch, device, False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    return measure(lambda batches: engine.evaluate(model, batches, device, autocast), loader, device, s)


def seed_eval(name, images, labels, s, device):
    backend_flags(False)
    model = fresh_model(name, device, False).eval()

    @torch.no_grad()
    def consume(batches):
        for x, y in batches:
            (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
    return measure(consume, seed_loader(images, labels, s, s["image_size"], s["batch_size"], False), device, s)


def side(measure_side):
    """One side of a row; its failure is recorded in the row, never erasing the other side."""
    try:
        return measure_side()
    except Exception as e:  # noqa: BLE001 -- e.g. too little shared memory for the seed's workers
        return {"error": " ".join(f"{type(e).__name__}: {e}".split())[:200]}


def bench_model(name, s, device, with_seed=True):
    images, labels = pool(POOL)
    size, batch = s["image_size"], s["batch_size"]
    skipped = {"error": "not measured (--seed-models)"}
    seed_tr = side(lambda: seed_train(name, images, labels, s, device)) if with_seed else skipped
    seed_ev = side(lambda: seed_eval(name, images, labels, s, device)) if with_seed else skipped
    rows = [row("train", name, size, batch, project_train(name, images, labels, s, device), seed_tr),
            row("eval", name, size, batch, project_eval(name, images, labels, s, device), seed_ev)]
    rows[1]["project_batch_size"] = batch * engine.EVAL_BATCH_FACTOR
    return rows


# ----------------------------------------------------------------------------------------------
# Report


def row(kind, model, size, batch, project, seed):
    """Both sides' figures; a seed side that failed or was skipped leaves the project's standing."""
    ok = "error" not in seed
    return {"kind": kind, "model": model, "image_size": size, "batch_size": batch,
            "project_img_s": round(project["img_s"], 1), "seed_img_s": round(seed["img_s"], 1) if ok else None,
            "ratio": round(project["img_s"] / seed["img_s"], 2) if ok else None, "project": project, "seed": seed}


def verdict(ratio, target):
    """'met', 'within noise' (a few steps on a shared CPU vary by about NOISE), or 'NOT met'."""
    if ratio >= target:
        return "met"
    return "within noise" if ratio >= target * (1 - NOISE) else "NOT met"


def targets(rows, device):
    """The issue's targets, checked where this run measured them."""
    out = {}
    data_row = next((r for r in rows if r["kind"] == "data" and "error" not in r), None)
    trains = [r for r in rows if r["kind"] == "train" and "error" not in r]
    compared = [r for r in trains if r["ratio"] is not None]
    if data_row and data_row["ratio"] and device.type == "cpu" and data_row["image_size"] == 224:
        out["data >= 5x the seed's (CPU, 224 px)"] = verdict(data_row["ratio"], 5)
    if compared:
        worst = min(compared, key=lambda r: r["ratio"])
        out[f"no training step slower than the seed's (slowest: {worst['model']} {worst['ratio']:.2f}x)"] = \
            verdict(worst["ratio"], 1)
    if data_row and trains and device.type == "cuda" and data_row["image_size"] == trains[0]["image_size"]:
        fastest = max(r["project_img_s"] for r in trains)
        out[f"data >= 3x the fastest model's training (GPU; {fastest:,.0f} img/s)"] = \
            verdict(data_row["project_img_s"] / fastest, 3)
    return out


def markdown(rows, s, machine, device, checks):
    lines = ["| row | model | px | batch | project img/s | seed img/s | project / seed |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            figures = f"failed: {r['error']} | | |"
        elif r["ratio"] is None:
            figures = f"{r['project_img_s']:,.0f} | {r['seed']['error']} | |"
        else:
            figures = f"{r['project_img_s']:,.0f} | {r['seed_img_s']:,.0f} | {r['ratio']:.2f}x |"
        lines.append(f"| {r['kind']} | {r['model'] or '-'} | {r['image_size']} | {r['batch_size']} | {figures}")
    cuda_side = ", bf16 autocast, channels_last, cudnn.benchmark, fused optimizer" if device.type == "cuda" else ""
    startup = [f"{r['seed']['warmup_s']:.1f} s" for r in rows if r["kind"] == "data" and "error" not in r
               and "warmup_s" in r["seed"]]
    notes = [f"Machine: {machine_line(machine)}; device {device.type}; {machine['torch_threads']} torch "
             f"thread(s), OMP_WAIT_POLICY={machine['omp_wait_policy']}.",
             f"Seed side: PIL DataLoader, {s['workers']} worker process(es), float32, NCHW. Project side: "
             f"TensorLoader{cuda_side}{', torch.compile' if s['compile'] else ''}.",
             f"Each side: {s['warmup']} warm-up batch(es), then at least {s['steps']} timed batch(es) and "
             f"{s['min_seconds']} s; models from random weights; the project evaluates with batch "
             f"x{engine.EVAL_BATCH_FACTOR}."]
    if startup:
        notes.append(f"Seed data path start-up (worker processes and first batches, excluded): {startup[0]}.")
    notes += [f"Target {name}: {status}." for name, status in checks.items()]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def report(rows, s, machine, device, argv):
    checks = targets(rows, device)
    return {"command": " ".join(["python", "benchmarks/bench.py", *argv]), "device": device.type,
            "settings": s, "machine": machine, "rows": rows, "targets": checks,
            "markdown": markdown(rows, s, machine, device, checks), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def save(path, result):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = settings(args)
    device = torch.device(args.device)
    machine = machine_info()
    print(f"bench: {machine_line(machine)}; {args.device}; data rows {s['data_size']} px batch {s['data_batch']}, "
          f"train/eval rows {s['image_size']} px batch {s['batch_size']}", flush=True)
    rows = []

    def add(kinds, model, size, batch, measure_rows):
        """Run one group of rows; a failure (say, too little shared memory for the workers) is
        recorded as that group's rows and the others still run."""
        try:
            new_rows = measure_rows()
        except Exception as e:  # noqa: BLE001 -- one failed row must not cost the whole run
            error = " ".join(f"{type(e).__name__}: {e}".split())[:200]
            new_rows = [{"kind": k, "model": model, "image_size": size, "batch_size": batch, "error": error}
                        for k in kinds]
        for r in new_rows:
            print(f"  {r['kind']} {r['model'] or ''}: " + (f"failed: {r['error']}" if "error" in r else
                  f"project {r['project_img_s']:,.0f} img/s, " + (f"seed {r['seed_img_s']:,.0f}, {r['ratio']:.2f}x"
                                                                   if r["ratio"] else f"seed {r['seed']['error']}")),
                  flush=True)
        rows.extend(new_rows)
        if args.json:  # after every model: a run cut short still leaves its rows
            save(args.json, report(rows, s, machine, device, argv))

    if not args.skip_data:
        add(["data"], None, s["data_size"], s["data_batch"], lambda: [bench_data(s, device)])
    if not args.skip_train:
        for name in args.models:
            with_seed = args.seed_models is None or name in args.seed_models
            add(["train", "eval"], name, s["image_size"], s["batch_size"], lambda: bench_model(name, s, device, with_seed))
    failed = any("error" in r for r in rows)
    print("\n" + report(rows, s, machine, device, argv)["markdown"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
