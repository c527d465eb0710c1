"""Train one of the five CIFAR-10 models, keep the best checkpoint by validation accuracy, test it.

    python train.py --model resnet_att                   # the seed's run: 224 px, 10 epochs, full data
    python train.py --model sample_resnet --image-size 32 --epochs 2 --train-subset 5000   # CPU smoke run
    python train.py --resume checkpoints/<run>/last.pth  # continue an interrupted run
    torchrun --nproc_per_node=4 train.py --model resnet_att_scratch   # data-parallel on 4 GPUs

Each run has its own name, <model>-<timestamp>: its log, CSV and curves go to log/<run>.*, its
checkpoints to <out>/<run>/ (last.pth and the best one, named after the model's file, e.g.
ResNet_att.pth). The test set is used once, at the end, on the best checkpoint.
"""
import argparse
import contextlib
import csv
import logging
import math
import os
import signal
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from models import MODELS, build_model, count_parameters
from utils import UserError, all_reduce_sum, atomic_save, run_cli, safe_load, setup_distributed, versions

# ----------------------------------------------------------------------------------------------
# Defaults per model, picked on the validation split (README, "Training defaults"). The ImageNet
# starts are fine-tuned with a 10x smaller learning rate than the from-scratch sample_resnet; the
# frozen models train only their head, for which AdamW needs no tuning of the lr to the
# (un-normalised) scale of the pooled ResNet features.
MODEL_DEFAULTS = {
    "sample_resnet": dict(optimizer="sgd", lr=0.1, weight_decay=5e-4),
    "resnet": dict(optimizer="adamw", lr=1e-3, weight_decay=1e-4),
    "resnet_att": dict(optimizer="adamw", lr=1e-3, weight_decay=5e-2),
    "resnet_scratch": dict(optimizer="sgd", lr=0.01, weight_decay=5e-4),
    "resnet_att_scratch": dict(optimizer="sgd", lr=0.01, weight_decay=5e-4),
}
BATCH_SIZE = 128  # the global batch (split over ranks under torchrun)
MOMENTUM = 0.9  # SGD, with Nesterov
WARMUP_EPOCHS = 1  # linear warmup from 0, then cosine decay to 0, stepped every batch
EVAL_BATCH_FACTOR = 2  # evaluation stores no activations: a larger batch fits
# Options that may differ between a run and its --resume; every other one is restored as saved.
RESUME_OVERRIDABLE = {"resume", "device", "workers", "compile", "stop_after", "dry_run", "data_dir", "no_download"}

log = logging.getLogger("train")


# ----------------------------------------------------------------------------------------------
# Command line


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage wall
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got {text}")
        return value
    return parse


def non_negative_int(text):
    return 0 if text == "0" else positive(int)(text)


def build_parser():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet_att", choices=list(MODELS))
    p.add_argument("--weights", default="imagenet",
                   help="imagenet (torchvision IMAGENET1K_V1, the seed's), imagenet_v2, none, or a local file; "
                        "ignored by sample_resnet")
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_ROOT", "cifar"),
                   help="folder holding cifar-10-batches-bin or cifar-10-batches-py (default: $CIFAR10_ROOT or cifar)")
    p.add_argument("--no-download", action="store_true", help="never download CIFAR-10")
    p.add_argument("--epochs", type=positive(int), default=10)
    p.add_argument("--batch-size", type=positive(int), default=BATCH_SIZE, help="global batch size")
    p.add_argument("--lr", type=positive(float), help="peak learning rate (default: per model)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], help="default: per model")
    p.add_argument("--weight-decay", type=float, help="default: per model")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--image-size", type=positive(int), default=224)
    p.add_argument("--no-augment", action="store_true",
                   help="no flip/crop; for resnet this trains the FC on pooled features computed once")
    p.add_argument("--data-path", choices=["tensor", "pil"], default="tensor",
                   help="tensor: batched augmentation on the device (fast); pil: the seed's DataLoader")
    p.add_argument("--val-every", type=positive(int), default=5)
    p.add_argument("--val-split", type=positive(int), default=5000, help="validation images held out of training")
    p.add_argument("--train-subset", type=positive(int), help="train on N images (after the validation split)")
    p.add_argument("--test-subset", type=positive(int), help="test on N images")
    p.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader workers (pil path)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun (CUDA only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="checkpoints", help="checkpoints go to OUT/<run>/")
    p.add_argument("--log-dir", default="log")
    p.add_argument("--run-name", help="default: <model>-<timestamp>")
    p.add_argument("--overwrite", action="store_true",
                   help="reuse an existing --run-name, deleting its old log, CSV, curves and checkpoints")
    p.add_argument("--resume", metavar="PATH", help="continue from a last.pth checkpoint")
    p.add_argument("--dry-run", action="store_true", help="build the model, print its parameter counts, exit")
    p.add_argument("--stop-after", type=positive(int), metavar="EPOCHS",
                   help="stop this process after EPOCHS epochs as if interrupted (tests resume)")
    p.add_argument("--no-probe", action="store_true", help=argparse.SUPPRESS)  # tests: the probe's reference
    return p


def given_options(parser, argv):
    """The dests of the options written on the command line."""
    flags = {tok.split("=", 1)[0] for tok in argv if tok.startswith("--")}
    return {a.dest for a in parser._actions if flags & set(a.option_strings)}


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    given = given_options(parser, argv)
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        for key, saved in ckpt["args"].items():
            if key in RESUME_OVERRIDABLE or key not in vars(args):
                continue
            if key in given and getattr(args, key) != saved:
                what = "model" if key == "model" else "option"
                raise UserError(f"--resume {args.resume} is a {ckpt['args']['model']} run; its {what} "
                                f"--{key.replace('_', '-')} was {saved!r}, cannot change it to "
                                f"{getattr(args, key)!r}", exit_code=2)
            setattr(args, key, saved)
    else:
        ckpt = None
        for key, value in MODEL_DEFAULTS[args.model].items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    if args.weight_decay < 0 or not 0 <= args.label_smoothing < 1:
        raise UserError("--weight-decay must be >= 0 and --label-smoothing in [0, 1)", exit_code=2)
    if args.val_split >= 50000:
        raise UserError(f"--val-split {args.val_split} leaves no training images (CIFAR-10 has 50,000)", exit_code=2)
    if args.train_subset and args.train_subset > 50000 - args.val_split:
        raise UserError(f"--train-subset {args.train_subset} is larger than the {50000 - args.val_split} "
                        f"training images left after --val-split {args.val_split}", exit_code=2)
    if args.test_subset and args.test_subset > 10000:
        raise UserError(f"--test-subset {args.test_subset} is larger than the 10,000 test images", exit_code=2)
    return args, ckpt


# ----------------------------------------------------------------------------------------------
# Checkpoints


# What every checkpoint of this project holds (checkpoint_state in main): checked up front, so that
# a file of another format is one clear error, not a KeyError deep in evaluate.py or --resume.
CHECKPOINT_KEYS = ("model", "state_dict", "args", "image_size", "classes", "epoch", "step", "optimizer",
                   "scheduler", "meter", "best_val_acc", "rng_state", "run_name")
MODEL_RECORD = ("name", "num_classes", "stride_in_1x1")


def load_checkpoint(path):
    """A checkpoint of this project, through torch.load(weights_only=True), or a UserError."""
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict):
        problem = f"a {type(ckpt).__name__}, not a dict"
    elif [k for k in CHECKPOINT_KEYS if k not in ckpt]:
        problem = "no " + ", ".join(k for k in CHECKPOINT_KEYS if k not in ckpt)
    elif not (isinstance(ckpt["model"], dict) and set(MODEL_RECORD) <= ckpt["model"].keys()
              and isinstance(ckpt["state_dict"], dict) and isinstance(ckpt["args"], dict)):
        problem = f"its model record is not {{{', '.join(MODEL_RECORD)}}} or its state_dict/args not dicts"
    else:
        return ckpt
    raise UserError(f"{path} is not a checkpoint of this project ({problem}); train.py writes them")


def save_checkpoint(state, is_best, run_dir, best_name):
    """last.pth always; a copy under the model's own name when it is the best so far."""
    for name in ["last.pth"] + ([best_name] if is_best else []):
        path = os.path.join(run_dir, name)
        try:
            atomic_save(state, path)
        except OSError as e:
            raise UserError(f"could not write checkpoint {path}: {e}; the checkpoints saved "
                            f"before are intact") from None


def model_from_checkpoint(ckpt, path):
    """Rebuild the checkpoint's network from its own record, without flags or weights files."""
    cfg = ckpt["model"]
    model, _ = build_model(cfg["name"], weights="none", num_classes=cfg["num_classes"],
                           stride_in_1x1=cfg["stride_in_1x1"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        detail = state_dict_mismatch(model.state_dict(), ckpt["state_dict"]) or " ".join(str(e).split())[:300]
        raise UserError(f"checkpoint {path} does not fit the {cfg['name']} network: {detail}") from None
    return model


def state_dict_mismatch(expected, given):
    """Why ``given`` does not load into a network with state dict ``expected``, short: PyTorch's
    message lists every key, hundreds for a ResNet-50."""
    shapes = [f"{k} {tuple(given[k].shape)} for {tuple(v.shape)}" for k, v in expected.items()
              if k in given and torch.is_tensor(given[k]) and given[k].shape != v.shape]
    found = {"missing keys": [k for k in expected if k not in given],
             "unexpected keys": [k for k in given if k not in expected], "other shapes": shapes}
    return "; ".join(f"{len(v)} {what} ({', '.join(v[:2])}{', ...' if len(v) > 2 else ''})"
                     for what, v in found.items() if v)


# ----------------------------------------------------------------------------------------------
# Training and evaluation


class Interrupted(Exception):
    pass


STOP_SIGNAL = []  # the signal number that asked us to stop, set by the handler
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def on_signal(signum, frame):
    # a second ^C: stop at once. Not under torchrun: its agent forwards the ^C it got, so every
    # rank sees the user's one ^C twice; the agent itself kills the ranks if they take too long
    if STOP_SIGNAL and "RANK" not in os.environ:
        raise KeyboardInterrupt
    STOP_SIGNAL.append(signum)


def stop_requested(device):
    """The signal any rank got (0: none); all ranks stop at the same step, also those it missed."""
    got = all_reduce_sum([float(s in STOP_SIGNAL) for s in STOP_SIGNALS], device)
    return next((s for s, n in zip(STOP_SIGNALS, got) if n), 0)


class Meter:
    """Running loss and accuracy sums (kept in the checkpoint to resume mid-epoch)."""

    def __init__(self, loss=0.0, correct=0, count=0):
        self.loss, self.correct, self.count = loss, correct, count

    def update(self, loss_sum, correct, count):
        self.loss, self.correct, self.count = self.loss + loss_sum, self.correct + correct, self.count + count

    def result(self):
        """(mean loss, accuracy, images) over all ranks."""
        loss, correct, count = all_reduce_sum([self.loss, self.correct, self.count], DEVICE)
        return loss / max(count, 1), correct / max(count, 1), int(count)


def train_one_epoch(net, batches, criterion, optimizer, scheduler, epoch, start_step, meter, autocast):
    """One pass over the training batches; raises Interrupted after the step a signal came in."""
    net.train()
    start = time.time()
    for step, (x, y) in enumerate(batches, start=start_step):
        x, y = x.to(DEVICE, non_blocking=True), y.to(DEVICE, non_blocking=True)
        with autocast:
            logits = net(x)
            loss = criterion(logits.float(), y)
        if not torch.isfinite(loss):
            raise UserError(f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                            f"(learning rate {scheduler.get_last_lr()[0]:.3g} too high?); stopped, "
                            f"the last good checkpoint is kept")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        meter.update(loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y))
        if hasattr(batches, "set_postfix"):  # tqdm
            batches.set_postfix(loss=f"{meter.loss / meter.count:.3f}", acc=f"{meter.correct / meter.count:.3f}",
                                img_s=f"{meter.count / (time.time() - start):.0f}", refresh=False)
        signum = stop_requested(DEVICE)
        if signum:
            raise Interrupted(step + 1, signum)


@torch.inference_mode()
def validate(net, loader, autocast, num_classes=10):
    """(loss, accuracy, confusion matrix [true, predicted]) over every sample of ``loader`` exactly
    once; under DDP each rank holds a disjoint share and the sums are reduced."""
    net.eval()
    loss_sum, confusion = 0.0, torch.zeros(num_classes, num_classes, dtype=torch.long, device=DEVICE)
    for x, y in loader:
        x, y = x.to(DEVICE, non_blocking=True), y.to(DEVICE, non_blocking=True)
        with autocast:
            logits = net(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes ** 2).view_as(confusion)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(confusion)
    loss_sum = all_reduce_sum([loss_sum], DEVICE)[0]
    count = confusion.sum().item()
    return loss_sum / count, confusion.trace().item() / count, confusion.cpu()


def make_optimizer(args, params, cuda):
    fused = {"fused": True} if cuda else {}
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=MOMENTUM, nesterov=True,
                               weight_decay=args.weight_decay, **fused)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, **fused)


def make_scheduler(optimizer, steps_per_epoch, epochs):
    """Linear warmup over WARMUP_EPOCHS (at most a tenth of the run), then cosine to zero."""
    total = steps_per_epoch * epochs
    warmup = min(WARMUP_EPOCHS * steps_per_epoch, total // 10)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class FeatureLoader:
    """Linear probe (resnet, --no-augment): pooled backbone features computed once; batches of
    (features, label) shuffled per epoch like the image loader, so the FC sees the same data."""

    def __init__(self, model, loader, train, batch_size, seed, autocast):
        feats, labels = [], []
        with torch.inference_mode(), autocast:
            model.eval()
            for x, y in loader:
                feats.append(model.features(x.to(DEVICE)).float().mean(dim=(2, 3)))
                labels.append(y.to(DEVICE))
        self.x, self.y = torch.cat(feats), torch.cat(labels)
        self.train, self.batch_size, self.seed = train, batch_size, seed
        self.epoch = self.start_step = 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        return data.num_batches(len(self.x), self.batch_size, self.train)

    def __iter__(self):
        n = len(self.x)
        g = torch.Generator(device=self.x.device).manual_seed(data.epoch_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=g, device=self.x.device) if self.train else torch.arange(n, device=self.x.device)
        for step in range(self.start_step, len(self)):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]
        self.start_step = 0


# ----------------------------------------------------------------------------------------------
# Logs: the seed's lines on the console and in log/<run>.log, a CSV per epoch, a PNG of the curves

CSV_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s"]


def setup_logging(log_file, master):
    log.setLevel(logging.INFO)
    log.handlers.clear()
    if not master:
        log.addHandler(logging.NullHandler())
        return
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(log_file)):
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)


def append_csv(path, row):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def plot_curves(csv_path, png_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def new_run_name(args):
    """A name no other run has, claimed by creating its checkpoint folder (two runs started in the
    same second must not both take it), unless --run-name --overwrite asks to reuse one."""
    base = args.run_name or f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    logs = lambda n: [os.path.join(args.log_dir, f"{n}.{ext}") for ext in ("log", "csv", "png")]
    if args.run_name and args.overwrite:
        # start afresh: the old run's rows would mix into the new CSV and curves, and its
        # checkpoints would pass for the new run's until replaced
        ckpts = [os.path.join(args.out, base, n) for n in ["last.pth"] + [m[1] for m in MODELS.values()]]
        for path in logs(base) + ckpts:
            if os.path.exists(path):
                os.remove(path)
        os.makedirs(os.path.join(args.out, base), exist_ok=True)
        return base
    name, k = base, 1
    while True:
        if not any(map(os.path.exists, logs(name))):
            with contextlib.suppress(FileExistsError):
                os.makedirs(os.path.join(args.out, name))  # atomic: fails if another run has it
                return name
        if args.run_name:
            raise UserError(f"run {base} exists (in {args.out} or {args.log_dir}); pick another "
                            f"--run-name, or add --overwrite", exit_code=2)
        k += 1
        name = f"{base}-{k}"


def broadcast(obj):
    if not torch.distributed.is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------


DEVICE = torch.device("cpu")


def main(argv=None):
    global DEVICE
    argv = sys.argv[1:] if argv is None else argv
    args, ckpt = parse_args(argv)

    # -- device, processes, precision --------------------------------------------------------
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available", exit_code=2)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    rank, _, world_size, DEVICE = setup_distributed(device)
    master = rank == 0
    cuda = DEVICE.type == "cuda"
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world_size} processes", exit_code=2)
    if args.sync_bn and world_size > 1 and not cuda:  # it would fail at the first step, mid-run
        raise UserError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm has no CPU implementation", exit_code=2)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    torch.manual_seed(args.seed)

    # -- model ---------------------------------------------------------------------------------
    if ckpt:
        model = model_from_checkpoint(ckpt, args.resume)
        model_cfg = ckpt["model"]
    else:
        model, model_cfg = build_model(args.model, weights=args.weights)
    trainable, total = count_parameters(model)
    if args.dry_run:
        print(f"Number of parameters: {trainable}")
        print(f"Total parameters: {total}")
        return 0
    model.to(DEVICE)
    if cuda:
        model.to(memory_format=torch.channels_last)
    if args.sync_bn and world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)

    # -- data ----------------------------------------------------------------------------------
    # resnet without augmentation is an exact linear probe: the frozen backbone's pooled features
    # never change, so compute them once and train the FC alone (single process only)
    probe = (args.no_augment and world_size == 1 and getattr(model, "frozen", False) and not args.no_probe
             and not list(model.head.body.parameters()))
    loaders = data.get_loaders(
        args.data_dir, args.batch_size, args.image_size, DEVICE, args.workers, args.val_split,
        args.train_subset, args.test_subset, args.seed, not args.no_download, args.data_path,
        augment=not args.no_augment, eval_batch_size=args.batch_size * EVAL_BATCH_FACTOR,
        rank=rank, world_size=world_size, channels_last=cuda, shuffle_train=not probe)
    net = eval_net = model  # what the training step and validation run
    if probe:
        loaders["train"] = FeatureLoader(model, loaders["train"], True, args.batch_size, args.seed, autocast)
        loaders["val"] = FeatureLoader(model, loaders["val"], False, args.batch_size, args.seed, autocast)
        net = eval_net = model.head.fc
    elif world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[DEVICE.index] if cuda else None)
    if args.compile:
        net = torch.compile(net)

    # -- optimisation --------------------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(args, params, cuda)
    scheduler = make_scheduler(optimizer, len(loaders["train"]), args.epochs)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    start_epoch, start_step, best_acc, meter = 0, 0, 0.0, Meter()
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, start_step, best_acc = ckpt["epoch"], ckpt["step"], ckpt["best_val_acc"]
        meter = Meter(**ckpt["meter"])
        torch.set_rng_state(ckpt["rng_state"])

    # -- run name, files -----------------------------------------------------------------------
    if ckpt:
        run_name, run_dir = ckpt["run_name"], os.path.dirname(os.path.abspath(args.resume))
    else:
        run_name = broadcast(new_run_name(args) if master else None)
        run_dir = os.path.join(args.out, run_name)
    best_name = MODELS[args.model][1]
    log_base = os.path.join(args.log_dir, run_name)
    if master:
        os.makedirs(run_dir, exist_ok=True)
        os.makedirs(args.log_dir, exist_ok=True)
    setup_logging(log_base + ".log", master)
    log.info(f"{'resuming' if ckpt else 'run'} {run_name}: {args.model}, {trainable:,} trainable of {total:,} "
             f"parameters, {DEVICE}{f' x{world_size}' if world_size > 1 else ''}, image size {args.image_size}, "
             f"batch {args.batch_size}, {args.optimizer} lr {args.lr}, {args.epochs} epochs"
             f"{', linear probe on cached features' if probe else ''}")
    log.info(f"checkpoints: {run_dir}/ (last.pth, {best_name}); log: {log_base}.log/.csv/.png")

    def checkpoint_state(epoch, step):
        return {
            "model": model_cfg, "image_size": args.image_size, "classes": list(data.CLASSES),
            "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step,
            "meter": vars(meter), "best_val_acc": best_acc, "args": vars(args),
            "run_name": run_name, "versions": versions(), "rng_state": torch.get_rng_state(),
        }

    # -- the loop ------------------------------------------------------------------------------
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    stop_at = start_epoch + args.stop_after if args.stop_after else args.epochs
    for epoch in range(start_epoch, min(args.epochs, stop_at)):
        log.info(f"epoch: {epoch + 1}")
        first_step = start_step if epoch == start_epoch else 0
        loaders["train"].set_epoch(epoch, first_step)
        bar = progress_bar(loaders["train"], master, epoch, args.epochs, first_step, meter)
        started = time.time()
        try:
            train_one_epoch(net, bar, criterion, optimizer, scheduler, epoch, first_step, meter, autocast)
        except Interrupted as stop:
            if master:
                save_checkpoint(checkpoint_state(epoch, stop.args[0]), False, run_dir, best_name)
            signum = stop.args[1]
            log.info(f"stopped by {signal.Signals(signum).name} at epoch {epoch + 1}, step {stop.args[0]}; "
                     f"saved {run_dir}/last.pth. Resume with: python train.py --resume {run_dir}/last.pth")
            return 128 + signum
        finally:
            if hasattr(bar, "close"):
                bar.close()
        seconds = time.time() - started
        train_loss, train_acc, images = meter.result()
        meter = Meter()
        log.info(f"Train loss : {train_loss:.4f}    Train Acc : {train_acc:.4f}")
        row = {"epoch": epoch + 1, "train_loss": f"{train_loss:.5f}", "train_acc": f"{train_acc:.5f}",
               "val_loss": "", "val_acc": "", "lr": f"{optimizer.param_groups[0]['lr']:.6g}",
               "seconds": f"{seconds:.1f}", "images_per_s": f"{images / seconds:.1f}"}
        is_best = False
        if (epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs:
            val_loss, val_acc, _ = validate(eval_net, loaders["val"], autocast)
            # the first validation always writes the best checkpoint, even at 0% (tiny runs)
            is_best = val_acc > best_acc or epoch + 1 == min(args.val_every, args.epochs)
            best_acc = max(best_acc, val_acc)
            log.info(f"Val loss : {val_loss:.4f}    Val Acc : {val_acc:.4f}")
            log.info(f"best accuracy is {best_acc:.4f}")
            row.update(val_loss=f"{val_loss:.5f}", val_acc=f"{val_acc:.5f}")
        if master:
            append_csv(log_base + ".csv", row)
            save_checkpoint(checkpoint_state(epoch + 1, 0), is_best, run_dir, best_name)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # the best checkpoint is on disk before anyone reads it
    if stop_at < args.epochs:
        log.info(f"stopped after {args.stop_after} epoch(s) (--stop-after); resume with: "
                 f"python train.py --resume {run_dir}/last.pth")
        return 0

    # -- the test set, once, on the best checkpoint ---------------------------------------------
    best = load_checkpoint(os.path.join(run_dir, best_name))
    model.load_state_dict(best["state_dict"])
    test_loss, test_acc, _ = validate(model, loaders["test"], autocast)
    log.info(f"best checkpoint: epoch {best['epoch']}, val acc {best['best_val_acc']:.4f}")
    log.info(f"Test loss : {test_loss:.4f}")
    log.info(f"Test Acc : {test_acc:.4f}")
    if master:
        plot_curves(log_base + ".csv", log_base + ".png")
    return 0


def progress_bar(loader, master, epoch, epochs, first_step, meter):
    """tqdm on a terminal (loss, accuracy, images/s, ETA); otherwise about ten plain lines an epoch."""
    if not master:
        return loader
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", total=len(loader), initial=first_step,
                    leave=False, dynamic_ncols=True)
    return PlainProgress(loader, epoch, epochs, first_step, meter)


class PlainProgress:
    def __init__(self, loader, epoch, epochs, first_step, meter):
        self.loader, self.epoch, self.epochs, self.first_step, self.meter = loader, epoch, epochs, first_step, meter

    def __iter__(self):
        total, start, m = len(self.loader), time.time(), self.meter
        every = max(total // 10, 1)
        for i, batch in enumerate(self.loader, start=self.first_step + 1):
            yield batch
            if i % every == 0 or i == total:
                rate = (i - self.first_step) / (time.time() - start)
                print(f"  epoch {self.epoch + 1}/{self.epochs} step {i}/{total}  loss {m.loss / max(m.count, 1):.4f}  "
                      f"acc {m.correct / max(m.count, 1):.4f}  {rate * len(batch[1]):.0f} img/s  "
                      f"eta {(total - i) / rate:.0f}s", flush=True)


if __name__ == "__main__":
    sys.exit(run_cli(main))
