"""Train one of the five CIFAR-10 models, keep the best checkpoint by validation accuracy, test it.

    python train.py --model resnet_att                   # the seed's run: 224 px, 10 epochs, full data
    python train.py --model sample_resnet --image-size 32 --epochs 2 --train-subset 5000   # CPU smoke run
    python train.py --model resnet --no-augment          # frozen backbone: the head trains on cached features
    python train.py --resume checkpoints/<run>/last.pth  # continue an interrupted run
    torchrun --nproc_per_node=4 train.py --model resnet_att_scratch   # data-parallel on 4 GPUs

Each run has its own name, <model>-<timestamp>: its log, CSV and curves go to log/<run>.*, its
checkpoints to <out>/<run>/ (last.pth and the best one, named after the model's file, e.g.
ResNet_att.pth). The test set is used once, at the end, on the best checkpoint.
"""
import argparse
import math
import os
import signal
import sys
import time

import torch
import torch.nn as nn

import checkpoints
import data
import engine
import features
import report
from models import MODELS, build_model, count_parameters
from utils import (PRECISIONS, Parser, StopSignals, UserError, all_reduce_sum, broadcast, non_negative,
                   non_negative_int, positive, run_cli, setup_runtime, tune_cpu_allocator, versions)

# Options that may differ between a run and its --resume; every other one is restored as saved.
RESUME_OVERRIDABLE = {"resume", "device", "workers", "compile", "stop_after", "dry_run", "data_dir", "no_download",
                      "cache_dir", "precision", "micro_batch", "checkpoint_every"}
# Steps between reads of the device-side loss (is it finite?) and, under torchrun, between the
# collective polls of the stop signals: a ^C takes effect within this many steps.
CHECK_EVERY = 8


# ----------------------------------------------------------------------------------------------
# Command line


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
    p.add_argument("--batch-size", type=positive(int), default=engine.BATCH_SIZE, help="global batch size")
    p.add_argument("--lr", type=positive(float), help="peak learning rate (default: per model)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], help="default: per model")
    p.add_argument("--weight-decay", type=float, help="default: per model")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--image-size", type=positive(int), default=224)
    p.add_argument("--no-augment", action="store_true",
                   help="no flip/crop; for the frozen resnet and resnet_att the head then trains on the "
                        "backbone's features, computed once and cached under --cache-dir")
    p.add_argument("--cache-dir", default="cache", help="feature cache of the frozen models (default: cache/)")
    p.add_argument("--cache-dtype", choices=["float16", "float32"], default="float16",
                   help="storage of the cached layer4 maps of resnet_att (float16: half the disk, ~5e-4 relative error)")
    p.add_argument("--data-path", choices=["tensor", "pil"], default="tensor",
                   help="tensor: batched augmentation on the device (fast); pil: the seed's DataLoader")
    p.add_argument("--val-every", type=positive(int), default=5)
    p.add_argument("--val-split", type=positive(int), default=5000, help="validation images held out of training")
    p.add_argument("--train-subset", type=positive(int), help="train on N images (after the validation split)")
    p.add_argument("--test-subset", type=positive(int), help="test on N images")
    p.add_argument("--workers", type=non_negative_int, default=len(os.sched_getaffinity(0)),
                   help="DataLoader workers of the pil path (default: the usable CPUs)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bfloat16 autocast on CUDA, float32 on a CPU (bit-reproducible); bf16 on a CPU "
                        "pays only with AMX (Intel Xeon 4th gen+: ~2x for ResNet-50), elsewhere it is slower")
    p.add_argument("--micro-batch", type=positive(int), metavar="N",
                   help="run each batch through the network in chunks of N images and add their gradients "
                        "(same global batch and lr, less memory; BatchNorm then normalises over N images)")
    p.add_argument("--checkpoint-every", type=non_negative(float), default=15.0, metavar="MINUTES",
                   help="also save last.pth mid-epoch every MINUTES of wall clock (0: only at epoch ends and "
                        "stops); a kill -9 loses at most that much training")
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
    p.add_argument("--no-probe", action="store_true", help=argparse.SUPPRESS)  # tests: train on images instead
    return p


def given_options(parser, argv):
    """The dests of the options written on the command line."""
    flags = {tok.split("=", 1)[0] for tok in argv if tok.startswith("--")}
    return {a.dest for a in parser._actions if flags & set(a.option_strings)}


def parse_args(argv):
    """-> (args, checkpoint or None). With --resume the run's own arguments come back from the
    checkpoint; one that may not change and was given with another value is refused."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = given_options(parser, argv)
    ckpt = None
    if args.resume:
        ckpt = checkpoints.load_checkpoint(args.resume, args_parser=parser)
        for key, saved in ckpt["args"].items():
            if key not in vars(args) or (key in RESUME_OVERRIDABLE and key in given):
                continue
            if key in given and getattr(args, key) != saved:
                what = "model" if key == "model" else "option"
                raise UserError(f"--resume {args.resume} is a {ckpt['args']['model']} run; its {what} "
                                f"--{key.replace('_', '-')} was {saved!r}, cannot change it to "
                                f"{getattr(args, key)!r}", exit_code=2)
            if key not in ("resume", "stop_after", "dry_run"):
                setattr(args, key, saved)
    else:
        for key, value in engine.MODEL_DEFAULTS[args.model].items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    if not 0 <= args.seed < 2**64:  # what torch.manual_seed and numpy's generators take
        raise UserError(f"--seed {args.seed} is not from 0 to 2**64 - 1", exit_code=2)
    if args.image_size > checkpoints.MAX_IMAGE_SIZE:
        raise UserError(f"--image-size {args.image_size} is larger than {checkpoints.MAX_IMAGE_SIZE} px "
                        "(CIFAR-10's images are 32 px)", exit_code=2)
    for flag, value in (("--out", args.out), ("--log-dir", args.log_dir), ("--cache-dir", args.cache_dir),
                        ("--run-name", args.run_name)):
        if value is not None and not value.strip():
            raise UserError(f"{flag} is empty", exit_code=2)
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
# Training and validation


class Interrupted(Exception):
    """A stop signal arrived: (steps done in this epoch, signal number)."""


def non_finite_error(epoch, step, value, lr):
    return UserError(f"loss became {value} at epoch {epoch + 1}, step {step} (learning rate {lr:.3g} too "
                     f"high?); stopped, the last good checkpoint is kept")


def train_one_epoch(net, loader, criterion, optimizer, scheduler, meter, rt, stop, epoch, first_step, progress,
                    saver, micro_batch=None):
    """One pass over the training batches. The step never waits for the device; every CHECK_EVERY
    steps (and at the end) the window's losses are read once: a non-finite one stops the run,
    naming its step, and a periodic checkpoint is written when one is due. Raises Interrupted
    after the step in which a stop signal was seen."""
    net.train()
    window = []  # (step, loss on the device) since the last check
    seen = meter.count  # images before this process's first step (a resumed epoch's)
    for step, (x, y) in enumerate(loader, start=first_step + 1):
        x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
        window.append((step, engine.train_step(net, x, y, criterion, optimizer, scheduler, rt.autocast, meter,
                                               micro_batch)))
        check = step % CHECK_EVERY == 0 or step == len(loader)
        if check or (rt.world_size == 1 and stop.received):
            signum, save_due = check_window(window, rt, stop, epoch, scheduler, saver.due())
            if signum:
                raise Interrupted(step, signum)
            if save_due and step < len(loader):  # the epoch's end saves anyway
                saver.save(epoch, step, meter)
        if progress.wants(step):
            loss, acc, images = meter.local_read()
            progress.show(step, loss, acc, images - seen)


def check_window(window, rt, stop, epoch, scheduler, save_due=False):
    """Read the window's losses (one host sync) and the stop signals (one all_reduce under DDP).
    -> (stop signal or 0, whether to save now: rank 0's clock decides for every rank)."""
    losses = torch.stack([loss for _, loss in window]).tolist()
    bad = next(((step, v) for (step, _), v in zip(window, losses) if not math.isfinite(v)), None)
    last_step = window[-1][0]
    window.clear()
    if rt.world_size > 1:  # every rank stops at the same step, for a signal or a divergence any rank saw
        flags = all_reduce_sum([float(s in stop.received) for s in stop.SIGNALS]
                               + [float(bad is not None), float(rt.master and save_due)], rt.device)
        if flags[-2] and bad is None:  # another rank's loss: by this step at the latest
            bad = (last_step, float("nan"))
        signum, save_due = next((s for s, n in zip(stop.SIGNALS, flags) if n), 0), bool(flags[-1])
    else:
        signum = stop.received[0] if stop.received else 0
    if bad is not None:
        raise non_finite_error(epoch, bad[0], bad[1], scheduler.get_last_lr()[0])
    return signum, save_due


def validate(net, loader, rt, stop):
    """Loss, accuracy and confusion matrix over ``loader``; raises engine.Stopped on a stop signal."""
    return engine.evaluate(net, loader, rt.device, rt.autocast, stop=stop)


class Checkpointer:
    """The checkpoint policy, in one place. last.pth is written at every epoch's end, at a stop,
    and mid-epoch every --checkpoint-every minutes; the best checkpoint (by validation accuracy)
    beside it. Never a non-finite state. Rank 0 writes, in the background; every rank keeps the
    best weights in memory for the final test. ``save`` re-raises a failed earlier write."""

    def __init__(self, model, model_cfg, optimizer, scheduler, args, rt, run_dir, run_name, best_acc):
        self.model, self.model_cfg, self.optimizer, self.scheduler = model, model_cfg, optimizer, scheduler
        self.args, self.rt, self.run_dir, self.run_name = args, rt, run_dir, run_name
        self.best_name = MODELS[args.model][1]
        self.best_acc, self.best = best_acc, None  # best: the weights chosen by this process, if any
        self.every_s, self.last_save = args.checkpoint_every * 60, time.monotonic()
        self.writer = checkpoints.CheckpointWriter()

    def due(self):
        self.writer.raise_if_failed()  # a failed write stops the run now, not at the next save
        return self.every_s > 0 and time.monotonic() - self.last_save >= self.every_s

    def choose(self, epoch, val_acc):
        """Whether the weights after ``epoch`` (1-based) are the best so far. The first validation
        always is, even at 0% (tiny runs): a run always has a best checkpoint."""
        is_best = val_acc > self.best_acc or epoch == min(self.args.val_every, self.args.epochs)
        self.best_acc = max(self.best_acc, val_acc)
        if is_best:  # kept for the test by every rank: none reads a file only rank 0 wrote
            self.best = {"state_dict": checkpoints.to_host(self.model.state_dict()), "epoch": epoch,
                         "best_val_acc": self.best_acc}
        return is_best

    def save(self, epoch, step, meter, is_best=False):
        """last.pth (and the best when ``is_best``): at ``step`` of epoch ``epoch`` (0-based), or at
        the end of epoch ``epoch`` (1-based) when ``step`` is 0."""
        if not engine.parameters_finite(self.model):
            raise UserError(f"the weights became non-finite in epoch {epoch if step == 0 else epoch + 1}, by step "
                            f"{step or 'its last'}; stopped, the last good checkpoint is kept")
        if self.rt.master:
            self.writer.save({
                "model": self.model_cfg, "image_size": self.args.image_size, "classes": list(data.CLASSES),
                "state_dict": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": epoch, "step": step,
                "meter": meter.local(), "best_val_acc": self.best_acc, "args": vars(self.args),
                "run_name": self.run_name, "versions": versions(), "rng_state": torch.get_rng_state(),
            }, is_best, self.run_dir, self.best_name)
        self.last_save = time.monotonic()

    def check_room(self):
        """Before the first step: room on --out's disk for the best, last.pth and a temporary copy."""
        if self.rt.master:
            checkpoints.check_room(self.run_dir, self.best_name,
                                   checkpoints.checkpoint_bytes(self.model, self.args.optimizer))

    def wait(self):
        self.writer.wait()


# ----------------------------------------------------------------------------------------------
# The run's phases


def open_run(args, ckpt, rt, trainable, total):
    """The run's folder and log: a new name, or the resumed run's. -> (run_dir, log_base, log)."""
    if ckpt:
        run_name, run_dir = ckpt["run_name"], os.path.dirname(os.path.abspath(args.resume))
    else:
        run_name = broadcast(checkpoints.new_run_name(args.model, args.run_name, args.overwrite, args.out,
                                                      args.log_dir, [m[1] for m in MODELS.values()])
                             if rt.master else None)
        run_dir = os.path.join(args.out, run_name)
    log_base = os.path.join(args.log_dir, run_name)
    if rt.master:
        for folder in (run_dir, args.log_dir):
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create {folder}: {e.strerror or e}") from None
    log = report.setup_logging("train", log_base + ".log", rt.master)
    micro = f" in chunks of {args.micro_batch}" if args.micro_batch and args.micro_batch < args.batch_size else ""
    log.info(f"{'resuming' if ckpt else 'run'} {run_name}: {args.model}, {trainable:,} trainable of {total:,} "
             f"parameters, {rt.device}{f' x{rt.world_size}' if rt.world_size > 1 else ''} {rt.precision}, image "
             f"size {args.image_size}, batch {args.batch_size}{micro}, {args.optimizer} lr {args.lr}, "
             f"{args.epochs} epochs")
    log.info(f"checkpoints: {run_dir}/ (last.pth, {MODELS[args.model][1]}); log: {log_base}.log/.csv/.png")
    return run_dir, log_base, log


def make_loaders(args, model, rt, log, stop):
    """-> (loaders, the network the training step runs, the one validation runs).

    A frozen backbone without augmentation sees each image the same way in every epoch: its
    features are computed once, cached on disk, and only the head trains (single process only)."""
    cached = args.no_augment and rt.world_size == 1 and getattr(model, "frozen", False) and not args.no_probe
    eval_bs = args.batch_size * engine.EVAL_BATCH_FACTOR
    net = eval_net = model
    if cached:
        splits = data.get_splits(args.data_dir, args.val_split, args.train_subset, args.test_subset, args.seed,
                                 not args.no_download)
        loaders = features.cached_loaders(model, splits, args.cache_dir, args.image_size, args.batch_size, eval_bs,
                                          args.seed, rt.device, rt.autocast, log, stop, args.cache_dtype)
        net = eval_net = model.head
        probe = not list(model.head.body.parameters())
        log.info(f"{'linear probe' if probe else 'head'} training on cached features ({args.cache_dir})")
    else:
        loaders = data.get_loaders(
            args.data_dir, args.batch_size, args.image_size, rt.device, args.workers, args.val_split,
            args.train_subset, args.test_subset, args.seed, not args.no_download, args.data_path,
            augment=not args.no_augment, eval_batch_size=eval_bs, rank=rt.rank, world_size=rt.world_size,
            channels_last=True)
        if rt.world_size > 1:
            net = nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.cuda else None)
    if args.compile:
        net = torch.compile(net)
    stop.exit_if_requested("while loading the data; nothing was written")
    return loaders, net, eval_net


def make_optimisation(args, model, steps_per_epoch, ckpt, fused=False):
    """-> (optimizer, scheduler, criterion, (epoch, step, best val acc, meter sums)) over the model's
    trainable parameters; resuming, all of it and the CPU RNG as the checkpoint left them."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = engine.make_optimizer(args.optimizer, args.lr, args.weight_decay, params, fused=fused)
    scheduler = engine.make_scheduler(optimizer, steps_per_epoch, args.epochs)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    if not ckpt:
        return optimizer, scheduler, criterion, (0, 0, 0.0, {})
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng_state"])
    return optimizer, scheduler, criterion, (ckpt["epoch"], ckpt["step"], ckpt["best_val_acc"], ckpt["meter"])


def fit(net, eval_net, loaders, criterion, optimizer, scheduler, saver, start, args, rt, stop, log, log_base):
    """The epoch loop: train, validate every --val-every epochs, checkpoint. ``start``: (epoch,
    step, meter sums) to continue from. -> None when every epoch is done (the test comes next), or
    the exit code of a run that stopped early (a signal, --stop-after)."""
    start_epoch, start_step, meter_state = start
    meter = engine.Meter(rt.device, **meter_state)
    stop_at = min(args.epochs, start_epoch + args.stop_after if args.stop_after else args.epochs)
    for epoch in range(start_epoch, stop_at):
        log.info(f"epoch: {epoch + 1}")
        first_step = start_step if epoch == start_epoch else 0
        loaders["train"].set_epoch(epoch, first_step)
        progress = report.EpochProgress(len(loaders["train"]), epoch, args.epochs, first_step, rt.master)
        started = time.time()
        try:
            train_one_epoch(net, loaders["train"], criterion, optimizer, scheduler, meter, rt, stop, epoch,
                            first_step, progress, saver, args.micro_batch)
        except Interrupted as e:
            steps, signum = e.args
            saver.save(epoch, steps, meter)
            saver.wait()
            return stopped(log, signum, f"at epoch {epoch + 1}, step {steps}", saver.run_dir)
        finally:
            progress.close()
        seconds = time.time() - started
        train_loss, train_acc, images = meter.read()
        log.info(f"Train loss : {train_loss:.4f}    Train Acc : {train_acc:.4f}")
        row = {"epoch": epoch + 1, "train_loss": f"{train_loss:.5f}", "train_acc": f"{train_acc:.5f}",
               "val_loss": "", "val_acc": "", "lr": f"{optimizer.param_groups[0]['lr']:.6g}",
               "seconds": f"{seconds:.1f}", "images_per_s": f"{images / seconds:.1f}"}
        is_best = False
        if (epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs:
            try:
                val_loss, val_acc, _ = validate(eval_net, loaders["val"], rt, stop)
            except engine.Stopped as e:  # resumes at the end of this epoch's steps: validation again
                saver.save(epoch, len(loaders["train"]), meter)
                saver.wait()
                return stopped(log, e.signum, f"during validation after epoch {epoch + 1}", saver.run_dir)
            is_best = saver.choose(epoch + 1, val_acc)
            log.info(f"Val loss : {val_loss:.4f}    Val Acc : {val_acc:.4f}")
            log.info(f"best accuracy is {saver.best_acc:.4f}")
            row.update(val_loss=f"{val_loss:.5f}", val_acc=f"{val_acc:.5f}")
        if rt.master:
            report.append_csv(log_base + ".csv", row)
        meter = engine.Meter(rt.device)  # the next epoch's sums; empty in a checkpoint at its step 0
        saver.save(epoch + 1, 0, meter, is_best)
    if stop_at < args.epochs:
        log.info(f"stopped after {args.stop_after} epoch(s) (--stop-after); resume with: "
                 f"python train.py --resume {saver.run_dir}/last.pth")
        return 0
    return None


def test_best(model, eval_net, loader, best, run_dir, best_name, rt, stop, log):
    """The test set, once, on the best weights (this process's, or rank 0's file sent to all)."""
    if best is None:
        best = broadcast(checkpoints.load_checkpoint(os.path.join(run_dir, best_name)) if rt.master else None)
    model.load_state_dict(best["state_dict"])
    try:
        test_loss, test_acc, _ = validate(eval_net, loader, rt, stop)
    except engine.Stopped as e:
        raise UserError(f"stopped by {signal.Signals(e.signum).name} during the final test; the checkpoints are "
                        f"complete: evaluate.py {run_dir}/{best_name} gives the test accuracy",
                        exit_code=128 + e.signum) from None
    log.info(f"best checkpoint: epoch {best['epoch']}, val acc {best['best_val_acc']:.4f}")
    log.info(f"Test loss : {test_loss:.4f}")
    log.info(f"Test Acc : {test_acc:.4f}")


def stopped(log, signum, where, run_dir):
    log.info(f"stopped by {signal.Signals(signum).name} {where}; saved {run_dir}/last.pth. "
             f"Resume with: python train.py --resume {run_dir}/last.pth")
    return 128 + signum


# ----------------------------------------------------------------------------------------------
# The run


def main(argv=None):
    tune_cpu_allocator()
    args, ckpt = parse_args(sys.argv[1:] if argv is None else argv)

    # -- device, processes, precision --------------------------------------------------------
    rt = setup_runtime(args.device, precision=args.precision)
    if args.batch_size % rt.world_size:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {rt.world_size} processes", exit_code=2)
    if args.sync_bn and rt.world_size > 1 and not rt.cuda:  # it would fail at the first step, mid-run
        raise UserError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm has no CPU implementation", exit_code=2)
    torch.manual_seed(args.seed)
    stop = StopSignals()
    stop.install()  # from here on, ^C and SIGTERM are requests that every phase honours

    # -- model ---------------------------------------------------------------------------------
    if ckpt:
        model, model_cfg = checkpoints.model_from_checkpoint(ckpt, args.resume), ckpt["model"]
    else:
        model, model_cfg = build_model(args.model, weights=args.weights)
    trainable, total = count_parameters(model)
    if args.dry_run:
        print(f"Number of parameters: {trainable}")
        print(f"Total parameters: {total}")
        return 0
    model.to(rt.device, memory_format=torch.channels_last)  # faster convolutions on the GPU and the CPU
    if args.sync_bn and rt.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)

    # -- run name, log, data, optimisation -------------------------------------------------------
    run_dir, log_base, log = open_run(args, ckpt, rt, trainable, total)
    loaders, net, eval_net = make_loaders(args, model, rt, log, stop)
    optimizer, scheduler, criterion, (epoch, step, best_acc, meter_state) = make_optimisation(
        args, model, len(loaders["train"]), ckpt, fused=rt.cuda)
    saver = Checkpointer(model, model_cfg, optimizer, scheduler, args, rt, run_dir, os.path.basename(log_base),
                         best_acc)
    saver.check_room()

    # -- the epochs, then the test set, once, on the best checkpoint -----------------------------
    try:
        code = fit(net, eval_net, loaders, criterion, optimizer, scheduler, saver, (epoch, step, meter_state),
                   args, rt, stop, log, log_base)
    finally:
        saver.wait()  # an exit of any kind leaves the last checkpoint complete
    if code is not None:
        return code
    test_best(model, eval_net, loaders["test"], saver.best, run_dir, saver.best_name, rt, stop, log)
    if rt.master:
        report.plot_curves(log_base + ".csv", log_base + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
