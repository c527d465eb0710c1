"""Train one of the five CIFAR-10 models, keep the best checkpoint by validation accuracy, test it.

    python train.py --model resnet_att                   # the seed's run: 224 px, 10 epochs, full data
    python train.py --model sample_resnet --image-size 32 --epochs 2 --train-subset 5000   # CPU smoke run
    python train.py --model resnet --no-augment          # frozen backbone: the head trains on cached features
    python train.py --resume checkpoints/<run>/last.pth  # continue an interrupted run
    python train.py --model resnet_att --no-augment --data-dir photos   # photos/train/<class>/*.jpg
    torchrun --nproc_per_node=4 train.py --model resnet_att_scratch   # data-parallel on 4 GPUs

Each run has its own name, <model>-<timestamp>: its log, CSV and curves go to log/<run>.*, its
checkpoints to <out>/<run>/ (last.pth and the best one, named after the model's file, e.g.
ResNet_att.pth). The test set is used once, at the end, on the best checkpoint.

Shape (pytorch/examples' imagenet): main() sets up the device, model, run folder, data and
optimiser; fit() runs the epochs (train_one_epoch, validate, the checkpoint policy of
checkpoints.Checkpointer); test_best() tests once.
"""
import argparse
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

import checkpoints
import data
import engine
import features
import report
from models import MODELS, build_model, count_parameters
from utils import (PRECISIONS, Parser, StopSignals, UserError, non_negative, non_negative_int, positive, run_cli,
                   setup_runtime, teardown_distributed, tune_cpu_allocator)

# Options that may differ between a run and its --resume; every other one is restored as saved.
RESUME_OVERRIDABLE = {"resume", "device", "workers", "compile", "stop_after", "dry_run", "data_dir", "no_download",
                      "cache_dir", "precision", "micro_batch", "checkpoint_every", "tensorboard", "strict"}
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
                   help="folder holding cifar-10-batches-bin or cifar-10-batches-py (default: $CIFAR10_ROOT or "
                        "cifar), or your own images as train/<class>/<image> (optional val/, test/ beside it)")
    p.add_argument("--strict", action="store_true",
                   help="image folders: stop at the first file that is not a usable image (default: skip, "
                        "count and list them)")
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
    p.add_argument("--cache-dir", default="cache",
                   help="feature cache of the frozen models and an image folder's decoded images (default: cache/)")
    p.add_argument("--cache-dtype", choices=["float16", "float32"], default="float16",
                   help="storage of the cached layer4 maps of resnet_att (float16: half the disk, ~5e-4 relative error)")
    p.add_argument("--data-path", choices=["tensor", "pil"], default="tensor",
                   help="tensor: batched augmentation on the device (fast); pil: the seed's DataLoader")
    p.add_argument("--val-every", type=positive(int), default=5)
    p.add_argument("--val-split", type=val_size,
                   help="validation images held out of training: a number (a multiple of the classes), or a "
                        "fraction of each class below 1 (default: 5000 for CIFAR-10; 0.1 for an image folder "
                        "without val/, whose val/ is used instead when it has one)")
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
    p.add_argument("--tensorboard", action="store_true",
                   help="live curves: TensorBoard event files in <log-dir>/tensorboard/<run>/ "
                        "(view: tensorboard --logdir log/tensorboard)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun (CUDA only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, metavar="SEED",
                   help="draw the validation hold-out and the subsets with SEED instead of --seed: seeds of one "
                        "setting then share one split (and the frozen models one feature cache)")
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


def val_size(text):
    """--val-split: a whole number of images >= 1, or a fraction of each class in (0, 1)."""
    value = positive(float)(text)
    if value >= 1:
        if value != int(value):
            raise argparse.ArgumentTypeError(f"{text} is neither a whole number of images nor a fraction below 1")
        return int(value)
    return value


def parse_args(argv):
    """-> (args, checkpoint or None). With --resume the run's own arguments come back from the
    checkpoint; one that may not change and was given with another value is refused."""
    parser = build_parser()
    args = parser.parse_args(argv)
    ckpt = None
    if args.resume:
        ckpt = checkpoints.load_checkpoint(args.resume, args_parser=parser)
        checkpoints.restore_args(args, ckpt, parser.given(argv), RESUME_OVERRIDABLE)
    else:
        engine.fill_model_defaults(args)
        if args.val_split is None:
            args.val_split = data.default_val_split(args.data_dir)
    check_args(args)
    return args, ckpt


def check_args(args):
    """What the parser's types cannot check alone: one line each, exit code 2."""
    empty = [f for f, v in (("--out", args.out), ("--log-dir", args.log_dir), ("--cache-dir", args.cache_dir),
                            ("--run-name", args.run_name)) if v is not None and not v.strip()]
    folder = data.is_folder(args.data_dir)  # an image folder's sizes are checked when it is read
    pool = 1 if folder else 50000 - data.cifar_held_out(args.val_split)
    problems = [
        (not 0 <= args.seed < 2**64, f"--seed {args.seed} is not from 0 to 2**64 - 1"),  # torch's and numpy's range
        (not 0 <= data.split_seed(vars(args)) < 2**64, f"--split-seed {args.split_seed} is not from 0 to 2**64 - 1"),
        (args.image_size > checkpoints.MAX_IMAGE_SIZE, f"--image-size {args.image_size} is larger than "
                                                        f"{checkpoints.MAX_IMAGE_SIZE} px (CIFAR-10's images are 32 px)"),
        (empty, f"{', '.join(empty)} is empty"),
        (args.weight_decay < 0 or not 0 <= args.label_smoothing < 1,
         "--weight-decay must be >= 0 and --label-smoothing in [0, 1)"),
        (pool <= 0, f"--val-split {args.val_split} leaves no training images (CIFAR-10 has 50,000)"),
        (not folder and pool > 0 and (args.train_subset or 0) > pool, f"--train-subset {args.train_subset} is larger than the "
                                                       f"{pool} training images left after --val-split {args.val_split}"),
        (not folder and (args.test_subset or 0) > 10000, f"--test-subset {args.test_subset} is larger than the 10,000 test images"),
    ]
    for bad, message in problems:
        if bad:
            raise UserError(message, exit_code=2)


# ----------------------------------------------------------------------------------------------
# Training and validation


@dataclass
class Loop:
    """What every epoch of the run uses, built once by main()."""
    net: nn.Module  # what the training step runs (DDP-wrapped, compiled, or the cached-feature head)
    eval_net: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    saver: checkpoints.Checkpointer
    tb: report.TensorBoard
    rt: object  # utils.Runtime
    stop: StopSignals
    log: object
    micro_batch: int = None


def train_one_epoch(loop, loader, meter, epoch, first_step, progress):
    """One pass over the training batches. The step never waits for the device; every CHECK_EVERY
    steps (and at the end) the window's losses are read once: a non-finite one stops the run,
    naming its step; TensorBoard gets its points; a periodic checkpoint is written when one is
    due. -> None, or (the step, the signal) when a stop signal ended the epoch early."""
    loop.net.train()
    window, seen, clock = [], meter.count, (time.time(), meter.count)  # seen: a resumed epoch's images
    for step, (x, y) in enumerate(loader, start=first_step + 1):
        x, y = x.to(loop.rt.device, non_blocking=True), y.to(loop.rt.device, non_blocking=True)
        window.append((step, engine.train_step(loop.net, x, y, loop.criterion, loop.optimizer, loop.scheduler,
                                               loop.rt.autocast, meter, loop.micro_batch)))
        if step % CHECK_EVERY == 0 or step == len(loader) or (loop.rt.world_size == 1 and loop.stop.received):
            signum, save_due, loss, acc = check_window(window, meter, loop, epoch)
            loop.tb.scalars(epoch * len(loader) + step, "train", loss=loss, acc=acc,
                            lr=loop.scheduler.get_last_lr()[0], images_per_s=(meter.count - clock[1]) /
                            max(time.time() - clock[0], 1e-9))
            clock = (time.time(), meter.count)
            if signum:
                return step, signum
            if save_due and step < len(loader):  # the epoch's end saves anyway
                loop.saver.save(epoch, step, meter)
        if progress.wants(step):
            loss, acc, images = meter.local_read()
            progress.show(step, loss, acc, images - seen)


def check_window(window, meter, loop, epoch):
    """Read the window's losses and the epoch's running sums (one host sync), and the stop signals
    (one all_reduce under DDP). -> (stop signal or 0, save now? (rank 0's clock decides for every
    rank), the window's mean loss, the epoch's accuracy so far)."""
    rt, stop = loop.rt, loop.stop
    values = torch.cat([torch.stack([loss for _, loss in window]).double(), meter.sums]).tolist()
    losses, correct = values[:len(window)], values[-1]
    bad = next(((step, v) for (step, _), v in zip(window, losses) if not math.isfinite(v)), None)
    last_step = window[-1][0]
    window.clear()
    loop.saver.raise_if_write_failed()
    save_due = loop.saver.due()
    signum = stop.received[0] if stop.received else 0
    if rt.world_size > 1:  # every rank stops at the same step, for a signal or a divergence any rank saw
        signum, any_bad, save_due = stop.requested(rt.device, bad is not None, rt.master and save_due)
        if any_bad and bad is None:  # another rank's loss: by this step at the latest
            bad = (last_step, float("nan"))
    if bad is not None:
        raise UserError(f"loss became {bad[1]} at epoch {epoch + 1}, step {bad[0]} (learning rate "
                        f"{loop.scheduler.get_last_lr()[0]:.3g} too high?); stopped, the last good checkpoint is kept")
    return signum, save_due, sum(losses) / len(losses), correct / max(meter.count, 1)


def validate(net, loader, rt, stop, keep_predictions=False):
    """Loss, accuracy and confusion matrix over ``loader`` (and the per-image predictions, with
    ``keep_predictions``); raises engine.Stopped on a stop signal."""
    return engine.evaluate(net, loader, rt.device, rt.autocast, stop=stop, keep_predictions=keep_predictions)


# ----------------------------------------------------------------------------------------------
# The run's phases


def open_dataset(args, rt, log, stop):
    """CIFAR-10 or the image folder of --data-dir; an image folder is decoded into its cache by
    rank 0 first, then read by every rank."""
    def load():
        return data.open_dataset(args.data_dir, args.image_size, not args.no_download, args.cache_dir, args.strict,
                                 log.info, stop)
    if rt.world_size == 1 or not data.is_folder(args.data_dir):
        return load()
    dataset = load() if rt.master else None
    torch.distributed.barrier()
    return dataset or load()


def make_loaders(args, model, rt, log, stop, dataset=None):
    """-> (loaders, the network the training step runs, the one validation runs): the model on
    images, or its head on cached features (features.make_loaders decides); DDP, compiled.
    ``dataset``: from ``open_dataset`` (opened here when not given)."""
    dataset = dataset or open_dataset(args, rt, log, stop)
    loaders, eval_net = features.make_loaders(args, model, rt, log, stop, dataset)
    net = eval_net
    if eval_net is model and rt.world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.cuda else None)
    if args.compile:
        net = torch.compile(net)
    stop.exit_if_requested("while loading the data; nothing was written")
    return loaders, net, eval_net


def fit(loop, loaders, start, args, log_base):
    """The epoch loop: train, validate every --val-every epochs, checkpoint. ``start``: (epoch,
    step, meter sums) to continue from. -> None when every epoch is done (the test comes next), or
    the exit code of a run that stopped early (a signal, --stop-after)."""
    (start_epoch, start_step, meter_state), rt, saver = start, loop.rt, loop.saver
    meter, steps = engine.Meter(rt.device, **meter_state), len(loaders["train"])
    stop_at = min(args.epochs, start_epoch + args.stop_after if args.stop_after else args.epochs)
    for epoch in range(start_epoch, stop_at):
        loop.log.info(f"epoch: {epoch + 1}")
        first_step = start_step if epoch == start_epoch else 0
        loaders["train"].set_epoch(epoch, first_step)
        progress = report.EpochProgress(steps, epoch, args.epochs, first_step, rt.master)
        started, before = time.time(), meter.count  # a resumed epoch's earlier images ran in another process
        try:
            interrupted = train_one_epoch(loop, loaders["train"], meter, epoch, first_step, progress)
        finally:
            progress.close()
        if interrupted:
            step, signum = interrupted
            return saver.stop(epoch, step, meter, signum, f"at epoch {epoch + 1}, step {step}", loop.log)
        seconds = time.time() - started
        engine.broadcast_buffers(saver.model)  # every rank validates and keeps what rank 0 saves
        train_loss, train_acc, images = meter.read()
        mine = images * (meter.count - before) / max(meter.count, 1)  # all ranks' images of this process's steps
        loop.log.info(f"Train loss : {train_loss:.4f}    Train Acc : {train_acc:.4f}")
        loop.tb.scalars((epoch + 1) * steps, "epoch", train_loss=train_loss, train_acc=train_acc)
        is_best, val = False, None
        if (epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs:
            try:
                val_loss, val_acc, _ = validate(loop.eval_net, loaders["val"], rt, loop.stop)
            except engine.Stopped as e:  # resumes at the end of this epoch's steps: validation again
                return saver.stop(epoch, steps, meter, e.signum, f"during validation after epoch {epoch + 1}",
                                  loop.log)
            is_best = saver.choose(epoch + 1, val_acc)
            loop.log.info(f"Val loss : {val_loss:.4f}    Val Acc : {val_acc:.4f}")
            loop.log.info(f"best accuracy is {saver.best_acc:.4f}")
            val = (val_loss, val_acc)
            loop.tb.scalars((epoch + 1) * steps, "epoch", val_loss=val_loss, val_acc=val_acc)
        if rt.master:
            report.append_csv(log_base + ".csv", report.epoch_row(
                epoch + 1, train_loss, train_acc, loop.optimizer.param_groups[0]["lr"], seconds, mine, val))
        meter = engine.Meter(rt.device)  # the next epoch's sums; empty in a checkpoint at its step 0
        saver.save(epoch + 1, 0, meter, is_best)
    if stop_at < args.epochs:
        loop.log.info(f"stopped after {args.stop_after} epoch(s) (--stop-after); resume with: "
                      f"python train.py --resume {saver.run_dir}/last.pth")
        return 0
    return None


def test_best(model, loop, loader):
    """The test set, once, on the best weights. -> (loss, accuracy, confusion matrix, (per-image
    probabilities, labels)), and the epoch of the best weights."""
    best = loop.saver.best_weights()
    model.load_state_dict(best["state_dict"])
    try:
        test_loss, test_acc, confusion, predictions = validate(loop.eval_net, loader, loop.rt, loop.stop,
                                                               keep_predictions=True)
    except engine.Stopped as e:
        raise UserError(f"stopped by {signal.Signals(e.signum).name} during the final test; the checkpoints are "
                        f"complete: evaluate.py {loop.saver.run_dir}/{loop.saver.best_name} gives the test accuracy",
                        exit_code=128 + e.signum) from None
    loop.log.info(f"best checkpoint: epoch {best['epoch']}, val acc {best['best_val_acc']:.4f}")
    loop.log.info(f"Test loss : {test_loss:.4f}")
    loop.log.info(f"Test Acc : {test_acc:.4f}")
    return test_loss, test_acc, confusion, predictions, best["epoch"]


def images(loader):
    """How many images a loader serves (0: none)."""
    if loader is None:
        return 0
    return len(loader.labels) if hasattr(loader, "labels") else len(loader.dataset)


# ----------------------------------------------------------------------------------------------
# The run


def main(argv=None):
    tune_cpu_allocator()
    args, ckpt = parse_args(sys.argv[1:] if argv is None else argv)

    # -- device, processes, precision --------------------------------------------------------
    rt = setup_runtime(args.device, precision=args.precision)
    try:
        return run(args, ckpt, rt)
    finally:
        teardown_distributed()


def run(args, ckpt, rt):
    if args.batch_size % rt.world_size:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {rt.world_size} processes", exit_code=2)
    if args.sync_bn and rt.world_size > 1 and not rt.cuda:  # it would fail at the first step, mid-run
        raise UserError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm has no CPU implementation", exit_code=2)
    torch.manual_seed(args.seed)
    stop = StopSignals()
    stop.install()  # from here on, ^C and SIGTERM are requests that every phase honours

    # -- model: its outputs are the data set's classes ---------------------------------------------
    classes = data.classes_of(args.data_dir)
    if ckpt:
        data.check_classes(ckpt["classes"], classes, args.resume, args.data_dir)
        model, model_cfg = checkpoints.model_from_checkpoint(ckpt, args.resume), ckpt["model"]
    else:
        model, model_cfg = build_model(args.model, weights=args.weights, num_classes=len(classes))
    trainable, total = count_parameters(model)
    if args.dry_run:
        print(f"Number of parameters: {trainable}")
        print(f"Total parameters: {total}")
        return 0
    model.to(rt.device, memory_format=torch.channels_last)  # faster convolutions on the GPU and the CPU
    if args.sync_bn and rt.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)

    # -- run folder, log, data, optimisation, checkpoints ------------------------------------------
    run_name, run_dir = checkpoints.run_folder(args, ckpt, rt.master)
    log_base = os.path.join(args.log_dir, run_name)
    log = report.open_run_log(args, rt, run_dir, log_base, resuming=bool(ckpt),
                              params=f"{trainable:,} trainable of {total:,}", best_name=MODELS[args.model][1])
    dataset = open_dataset(args, rt, log, stop)
    loaders, net, eval_net = make_loaders(args, model, rt, log, stop, dataset)
    log.info(f"data: {dataset.name}, {len(classes)} classes, " + " / ".join(
        f"{images(loaders[k]):,} {k}" for k in ("train", "val", "test")) + " images")
    if dataset.val is not None and args.val_split != data.default_val_split(args.data_dir):
        log.info(f"--val-split {args.val_split} is not used: {os.path.join(args.data_dir, 'val')} holds the "
                 f"validation images")
    optimizer, scheduler, criterion, (epoch, step, best_acc, meter_state) = engine.make_optimisation(
        args, model, len(loaders["train"]), ckpt, fused=rt.cuda)
    saver = checkpoints.Checkpointer(model, model_cfg, optimizer, scheduler, args, rt, run_dir, run_name, best_acc,
                                     classes)
    saver.check_room()
    tb = report.TensorBoard(os.path.join(args.log_dir, "tensorboard", run_name), args.tensorboard and rt.master,
                            purge_step=epoch * len(loaders["train"]) + step + 1 if ckpt else None)
    loop = Loop(net, eval_net, criterion, optimizer, scheduler, saver, tb, rt, stop, log, args.micro_batch)

    # -- the epochs, then the test set, once, on the best checkpoint -----------------------------
    try:
        code = fit(loop, loaders, (epoch, step, meter_state), args, log_base)
        if code is not None:
            return code
        if loaders["test"] is None:
            log.info(f"no test images ({args.data_dir} has no test/ folder): no test pass; the best checkpoint is "
                     f"{saver.run_dir}/{saver.best_name}")
        else:
            test_loss, test_acc, confusion, predictions, best_epoch = test_best(model, loop, loaders["test"])
            tb.test_results(args.epochs * len(loaders["train"]), test_loss, test_acc, confusion, classes,
                            vars(args), saver.best_acc)
    finally:
        saver.wait()  # an exit of any kind leaves the last checkpoint complete
        tb.close()
    if rt.master:
        report.plot_curves(log_base + ".csv", log_base + ".png")
    if rt.master and loaders["test"] is not None:
        probs, predicted, labels = predictions
        report.save_predictions(report.predictions_path(log_base), probs, labels,
                                data.test_indices(args.test_subset, data.split_seed(vars(args)), data.test_count(dataset)),
                                report.predictions_meta(dataset.name, classes, vars(args), run_name, saver.best_name,
                                                        best_epoch, test_loss, test_acc), predicted)
        report.plot_confusion(confusion.cpu().numpy(), classes, log_base + "-confusion.png",
                              report.confusion_title(f"{run_name} ({args.model}, best checkpoint)", test_acc, confusion))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
