"""The checkpoint format, in one place: what a checkpoint holds, how it is written (atomically, with
a one-line error and the old files intact when the disk is full), how a file a user hands us is
checked field by field (read through torchfile.safe_load), and how a network is rebuilt from a
checkpoint alone.

    model, info = load_model("checkpoints/<run>/ResNet_att.pth")   # eval mode, on the CPU
    x = info["transform"](PIL.Image.open("cat.png").convert("RGB"))
    print(info["classes"][model(x[None]).argmax()])

A checkpoint is one dict of tensors and plain Python types, loadable with
``torch.load(path, weights_only=True)``:

    model         {"name", "num_classes", "stride_in_1x1"}: rebuilds the network without flags or weights files
    state_dict    the network's weights (no "module."/"_orig_mod." prefixes)
    image_size    the side the images were resized to; classes: the class names, in label order
    epoch, step   where training stands (step > 0: inside epoch ``epoch``, after that many steps)
    optimizer, scheduler, meter, rng_state    what resuming needs, bit for bit
    best_val_acc  the best validation accuracy so far; args: the run's arguments; run_name, versions
"""
import argparse
import contextlib
import copy
import glob
import os
import reprlib
import shutil
import signal
import threading
import time
import warnings

import torch

import data
import engine
from models import MODELS, build_model
from report import run_settings
from torchfile import plain_tensor, safe_load
from utils import UserError, broadcast, first_line, versions

KEYS = ("model", "state_dict", "args", "image_size", "classes", "epoch", "step", "optimizer",
        "scheduler", "meter", "best_val_acc", "rng_state", "run_name")
MODEL_RECORD = ("name", "num_classes", "stride_in_1x1")
LAST = "last.pth"


# ----------------------------------------------------------------------------------------------
# Files


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the old file or the new one, never half of one; a write
    error (disk full) removes the temporary file and leaves the old file untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    # a process killed mid-save (kill -9) leaves its temporary file behind; one process writes a
    # run's files, so any other temporary file of this name is such a leftover
    for stale in glob.glob(glob.escape(os.path.join(folder, f".{os.path.basename(path)}.tmp")) + "*"):
        os.remove(stale)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


# ----------------------------------------------------------------------------------------------
# The format


def load_checkpoint(path, args_parser=None):
    """A checkpoint of this project, through torch.load(weights_only=True), or a UserError.

    Every field is checked for what evaluate.py, train.py --resume and ``load_model`` do with it,
    so they can trust it: a damaged or hand-edited file is one clear line, not a traceback later.
    ``args_parser`` (train.py's, for --resume) also checks every saved argument against it."""
    ckpt = safe_load(path)
    problem = record_problem(ckpt, args_parser)
    if problem:
        raise UserError(f"{path} is not a checkpoint of this project ({problem}); train.py writes them")
    return ckpt


MAX_IMAGE_SIZE = 4096  # CIFAR-10's 32 px images resized 128x: beyond it, a corrupted number


def record_problem(ckpt, args_parser=None):
    """Why ``ckpt`` is not a checkpoint train.py could have written, or None. Values are quoted
    through reprlib: short, and safe from a list nested a thousand deep."""
    if not isinstance(ckpt, dict):
        return f"a {type(ckpt).__name__}, not a dict"
    if ckpt.get("format") == RELEASE_FORMAT:
        return "it is a weights-only release file (export.py): it cannot resume; evaluate.py and load_model read it"
    if [k for k in KEYS if k not in ckpt]:
        return "no " + ", ".join(k for k in KEYS if k not in ckpt)
    problem = network_problem(ckpt)
    if problem:
        return problem
    opt = ckpt["optimizer"]
    if not count(ckpt["step"]):
        return "its step is not a count"
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in opt["param_groups"])
            and isinstance(ckpt["scheduler"], dict)):
        return "its optimizer or scheduler is not a state_dict of torch.optim"
    meter, rng = ckpt["meter"], ckpt["rng_state"]
    if not (isinstance(meter, dict) and set(meter) <= {"loss", "correct", "count"} and number(meter.get("loss", 0))
            and count(meter.get("correct", 0)) and count(meter.get("count", 0))):
        return "its meter is not {loss: a number, correct, count: counts}"
    if not (torch.is_tensor(rng) and rng.dtype == torch.uint8 and rng.shape == torch.get_rng_state().shape):
        return "its rng_state is not torch.get_rng_state()'s"
    return args_problem(ckpt["args"], ckpt["model"]["name"], ckpt["image_size"], args_parser)


def network_problem(ckpt):
    """What a checkpoint and a release file share, checked: the network's record and weights, its
    image size and classes, the epoch and validation accuracy it was chosen at, its run's name."""
    model, classes = ckpt["model"], ckpt["classes"]
    if not (isinstance(model, dict) and set(MODEL_RECORD) <= model.keys() and isinstance(ckpt["state_dict"], dict)
            and isinstance(ckpt["args"], dict)):
        return f"its model record is not {{{', '.join(MODEL_RECORD)}}} or its state_dict/args not dicts"
    if not (isinstance(model["name"], str) and model["name"] in MODELS):
        return f"its model {reprlib.repr(model['name'])} is none of {', '.join(MODELS)}"
    if not (count(model["num_classes"]) and isinstance(model["stride_in_1x1"], (bool, type(None)))):
        return "its model record's num_classes is not a count or its stride_in_1x1 not a bool"
    if not (isinstance(classes, (list, tuple)) and all(isinstance(c, str) and c and c.isprintable() for c in classes)
            and len(set(classes)) == len(classes) == model["num_classes"] >= 2):
        return "its classes are not distinct printable names, at least two, one per output of its network"
    if not all(isinstance(k, str) and plain_tensor(v) for k, v in ckpt["state_dict"].items()):
        return "its state_dict is not a dict of names to (dense, real, CPU) tensors"
    if not (count(ckpt["image_size"]) and 0 < ckpt["image_size"] <= MAX_IMAGE_SIZE):
        return (f"its image_size {reprlib.repr(ckpt['image_size'])} is not a whole number of pixels "
                f"from 1 to {MAX_IMAGE_SIZE}")
    if not (count(ckpt["epoch"]) and number(ckpt["best_val_acc"])):
        return "its epoch is not a count or its best_val_acc not a number"
    if not (isinstance(ckpt["run_name"], str) and ckpt["run_name"] and "\0" not in ckpt["run_name"]):
        return f"its run_name {reprlib.repr(ckpt['run_name'])} is not a name"
    return None


def count(value):
    """A whole number >= 0 (not a bool, which Python counts as an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# train.py fills these per model when they are not given: a run's arguments always hold them;
# evaluate.py reads val_split and seed (the test split) from them
REQUIRED_ARGS = ("model", "optimizer", "lr", "weight_decay", "val_split", "seed")


def args_problem(args, model_name, image_size, parser=None):
    """Why ``args`` are not the arguments of a train.py run of ``model_name`` at ``image_size``, or
    None. Always: the REQUIRED_ARGS are there, with the seed and test subset evaluate.py uses.
    With ``parser`` (train.py --resume restores each argument): each must be a value that command
    line can give (its types, ranges and choices; no NUL in a string). An option missing from an
    older checkpoint takes train.py's default, except those in REQUIRED_ARGS."""
    if [k for k in REQUIRED_ARGS if k not in args]:
        return "its args have no " + ", ".join(k for k in REQUIRED_ARGS if k not in args)
    val_split = args["val_split"]
    if not (count(args["seed"]) and (count(val_split) or (number(val_split) and 0 < val_split < 1))
            and count(args.get("image_size", image_size))
            and isinstance(args["model"], str)):
        return "its args' --seed, --val-split, --image-size or --model is not of its type"
    for action in parser._actions if parser else []:
        key = action.dest
        if key not in args or action.default == argparse.SUPPRESS:
            continue
        value = args[key]
        if value is None and action.default is None and key not in REQUIRED_ARGS:
            continue  # an option not given
        if isinstance(action, argparse._StoreTrueAction):
            ok = isinstance(value, bool)
        else:
            try:
                ok = (isinstance(value, (str, int, float)) and not isinstance(value, bool) and "\0" not in str(value)
                      and (action.type or str)(str(value)) == value
                      and (action.choices is None or value in action.choices))
            except (ValueError, TypeError, argparse.ArgumentTypeError):
                ok = False
        if not ok:
            return f"its args' {action.option_strings[0]} {reprlib.repr(value)} is not a value train.py takes"
    if not 0 <= args["seed"] < 2**64:  # what torch.manual_seed and numpy's generators take
        return f"its args' --seed {args['seed']} is not from 0 to 2**64 - 1"
    split_seed = args.get("split_seed")  # evaluate.py draws the test subset with it
    if split_seed is not None and not (count(split_seed) and 0 <= split_seed < 2**64):
        return f"its args' --split-seed {reprlib.repr(split_seed)} is not from 0 to 2**64 - 1"
    test_subset = args.get("test_subset")
    if test_subset is not None and not (count(test_subset) and 0 < test_subset):  # 0 would test nothing
        return f"its args' --test-subset {reprlib.repr(test_subset)} is not a count from 1"
    if args["model"] != model_name or args.get("image_size", image_size) != image_size:
        return f"its args' --model {reprlib.repr(args['model'])} or --image-size is not its record's"
    return None


def restore_args(args, ckpt, given, overridable):
    """train.py --resume: the run's own arguments from ``ckpt`` into ``args``, except the options in
    ``overridable`` that were ``given`` on the command line; any other option given with another
    value than the run's is refused (a run cannot change model or schedule halfway)."""
    for key, saved in ckpt["args"].items():
        if key not in vars(args) or (key in overridable and key in given):
            continue
        if key in given and getattr(args, key) != saved:
            what = "model" if key == "model" else "option"
            raise UserError(f"--resume {args.resume} is a {ckpt['args']['model']} run; its {what} "
                            f"--{key.replace('_', '-')} was {saved!r}, cannot change it to "
                            f"{getattr(args, key)!r}", exit_code=2)
        if key not in ("resume", "stop_after", "dry_run"):
            setattr(args, key, saved)


def save_checkpoint(state, is_best, run_dir, best_name):
    """last.pth always; a copy under the model's own name when it is the best so far. A write that
    fails (full disk, I/O error, read-only folder) is one UserError naming the file, the space it
    needed and what was free; the files saved before are untouched and no temporary file is left."""
    for name in [LAST] + ([best_name] if is_best else []):
        path = os.path.join(run_dir, name)
        try:
            atomic_save(state, path)
        except (OSError, RuntimeError) as e:  # torch's zip writer turns a failed write into a RuntimeError
            raise UserError(f"could not write checkpoint {path} ({write_error(e)}; it needs about "
                            f"{mb(state_bytes(state))}, {mb(free_bytes(run_dir))} free there); the checkpoints "
                            f"saved before are intact") from None


def write_error(e):
    """The OS's reason for a failed write (its strerror), also when torch wrapped it."""
    while e is not None:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        if isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or "file write failed" in str(e)):
            cause = e.__cause__ or e.__context__
            if cause is None:  # torch lost the errno: the one reason its writer reports it this way
                return "the write failed: no space left on the device, or an I/O error"
            e = cause
            continue
        return first_line(e)
    return "unknown error"


def state_bytes(obj):
    """The tensors' bytes in ``obj`` (a checkpoint): about its size on disk."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def free_bytes(folder):
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def mb(n):
    return f"{n / 2**20:,.1f} MB"


OVERHEAD = 1 << 20  # a checkpoint's non-tensor part (arguments, names, the zip directory) is < 1 MB


def checkpoint_bytes(model, optimizer_name):
    """About the size of this run's checkpoint before it has one: the weights and buffers, plus the
    optimiser's state per trainable parameter (SGD: a momentum buffer; AdamW: two moments)."""
    weights = state_bytes(model.state_dict())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights + trainable * (2 if optimizer_name == "adamw" else 1) + OVERHEAD


def check_room(run_dir, best_name, size):
    """Refuse, before the first step, a --out whose disk cannot hold the best checkpoint, last.pth
    and the temporary copy a save writes before its rename (files already there count as room)."""
    there = sum(os.path.getsize(p) for p in (os.path.join(run_dir, LAST), os.path.join(run_dir, best_name))
                if os.path.isfile(p))
    needed, free = 3 * size - there, free_bytes(run_dir)
    if free < needed:
        raise UserError(f"{run_dir} has {mb(free)} free; this run's checkpoints need about {mb(needed)} "
                        f"(the best, last.pth and a temporary copy, {mb(size)} each): free some space "
                        f"or pass another --out")


def model_from_checkpoint(ckpt, path, resuming=True):
    """Rebuild the checkpoint's network from its own record, without flags or weights files.

    ``resuming`` (train.py --resume) also checks that the optimizer and scheduler state restores."""
    cfg = ckpt["model"]
    model, _ = build_model(cfg["name"], weights="none", num_classes=cfg["num_classes"],
                           stride_in_1x1=cfg["stride_in_1x1"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        detail = state_dict_mismatch(model.state_dict(), ckpt["state_dict"]) or " ".join(str(e).split())[:300]
        raise UserError(f"checkpoint {path} does not fit the {cfg['name']} network: {detail}") from None
    if resuming:
        check_resumable(ckpt, model, path)
    return model


def check_resumable(ckpt, model, path):
    """Restore the optimizer and scheduler state as train.py --resume does, and take one step, on
    copies: torch.optim checks little when it loads a state (a group of other parameters, a
    momentum buffer of another shape, a learning rate that is a string all fail only later, at
    some step). Whatever goes wrong here would go wrong in training: a one-line UserError."""
    args = ckpt["args"]
    params = [p.detach().clone().requires_grad_() for p in model.parameters() if p.requires_grad]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer = engine.make_optimizer(args["optimizer"], args["lr"], args["weight_decay"], params)
            scheduler = engine.make_scheduler(optimizer, 1, args.get("epochs", 1))
            optimizer.load_state_dict(copy.deepcopy(ckpt["optimizer"]))
            scheduler.load_state_dict(copy.deepcopy(ckpt["scheduler"]))
            for p in params:
                p.grad = torch.zeros_like(p)
            optimizer.step()
            scheduler.step()
    except Exception as e:
        raise UserError(f"checkpoint {path}: its optimizer or scheduler state does not restore on the "
                        f"{ckpt['model']['name']} network ({type(e).__name__}: {first_line(e)})") from None


def state_dict_mismatch(expected, given):
    """Why ``given`` does not load into a network with state dict ``expected``, short: PyTorch's
    message lists every key, hundreds for a ResNet-50."""
    shapes = [f"{k} {tuple(given[k].shape)} for {tuple(v.shape)}" for k, v in expected.items()
              if k in given and torch.is_tensor(given[k]) and given[k].shape != v.shape]
    found = {"missing keys": [k for k in expected if k not in given],
             "unexpected keys": [k for k in given if k not in expected], "other shapes": shapes}
    return "; ".join(f"{len(v)} {what} ({', '.join(v[:2])}{', ...' if len(v) > 2 else ''})"
                     for what, v in found.items() if v)


def load_model(path, device="cpu"):
    """-> (network in eval mode on ``device``, info): the user's way to use a checkpoint, or a
    release file of export.py, from Python.

    ``info``: name, classes, image_size, epoch, best_val_acc, run_name, args (the run's; a
    release file's settings and split only), test_acc (a release file's, else None), and
    ``transform``, which turns an RGB PIL image into the network's input as evaluation does."""
    ckpt = safe_load(path)
    if isinstance(ckpt, dict) and ckpt.get("format") == RELEASE_FORMAT:
        problem = release_problem(ckpt)
        if problem:
            raise UserError(f"{path} is not a release file of this project ({problem}); export.py writes them")
    else:
        problem = record_problem(ckpt)
        if problem:
            raise UserError(f"{path} is not a checkpoint of this project ({problem}); train.py writes them")
    model = model_from_checkpoint(ckpt, path, resuming=False).to(device).eval()
    info = {"name": ckpt["model"]["name"], "classes": list(ckpt["classes"]), "image_size": ckpt["image_size"],
            "epoch": ckpt["epoch"], "best_val_acc": ckpt["best_val_acc"], "run_name": ckpt["run_name"],
            "args": ckpt["args"], "test_acc": ckpt.get("test_acc"),
            "transform": data.eval_transform(ckpt["image_size"])}
    return model, info


# ----------------------------------------------------------------------------------------------
# The release file (export.py): the network alone, for use elsewhere

RELEASE_FORMAT = "cifar10-cbam-release"  # a weights-only file: no optimiser, nothing to resume
RELEASE_VERSION = 1
# Of the run's arguments a release keeps its settings (report.run_settings: compare.py groups by
# them) and its seeds (evaluate.py re-draws its test split with them); nothing of where it ran.
RELEASE_KEYS = ("format", "version", "model", "state_dict", "image_size", "classes", "mean", "std", "epoch",
                "best_val_acc", "test_acc", "run_name", "args", "versions")


def release_state(ckpt, dtype=torch.float32, test_acc=None):
    """The release file's dict of a checkpoint: its network's weights (conv and linear weights in
    ``dtype``; biases and BatchNorm statistics, a few KB, stay float32: a running variance below
    float16's 6e-5 would lose its digits), what rebuilds and feeds the network, and where it came from."""
    weights = {k: v.detach().to(dtype) if v.is_floating_point() and v.dim() >= 2 else v.detach()
               for k, v in ckpt["state_dict"].items()}
    return {"format": RELEASE_FORMAT, "version": RELEASE_VERSION, "model": dict(ckpt["model"]), "state_dict": weights,
            "image_size": ckpt["image_size"], "classes": list(ckpt["classes"]), "mean": list(data.MEAN),
            "std": list(data.STD), "epoch": ckpt["epoch"], "best_val_acc": ckpt["best_val_acc"], "test_acc": test_acc,
            "run_name": ckpt["run_name"], "args": {**run_settings(ckpt["args"]), "seed": ckpt["args"]["seed"],
                                                   "split_seed": ckpt["args"].get("split_seed")},
            "versions": versions()}


def release_problem(obj):
    """Why ``obj`` is not a release file release_state wrote, or None."""
    if [k for k in RELEASE_KEYS if k not in obj]:
        return "no " + ", ".join(k for k in RELEASE_KEYS if k not in obj)
    if obj["version"] != RELEASE_VERSION:
        return f"version {reprlib.repr(obj['version'])}, this code reads version {RELEASE_VERSION}"
    problem = network_problem(obj)
    if problem:
        return problem
    if not (obj["test_acc"] is None or (number(obj["test_acc"]) and 0 <= obj["test_acc"] <= 1)):
        return f"its test_acc {reprlib.repr(obj['test_acc'])} is not an accuracy"
    if list(obj["mean"]) != list(data.MEAN) or list(obj["std"]) != list(data.STD):
        return "its mean/std are not the normalisation this code applies"
    return args_problem(obj["args"], obj["model"]["name"], obj["image_size"])


# ----------------------------------------------------------------------------------------------
# A run's checkpoints: the policy


class Checkpointer:
    """The checkpoint policy, in one place. last.pth is written at every epoch's end, at a stop,
    and mid-epoch every --checkpoint-every minutes; the best checkpoint (by validation accuracy)
    beside it. Never a non-finite state. Rank 0 writes, in the background; every rank keeps the
    best weights in memory for the final test. ``save`` re-raises a failed earlier write."""

    def __init__(self, model, model_cfg, optimizer, scheduler, args, rt, run_dir, run_name, best_acc, classes):
        self.model, self.model_cfg, self.optimizer, self.scheduler = model, model_cfg, optimizer, scheduler
        self.classes = list(classes)
        self.args, self.rt, self.run_dir, self.run_name = args, rt, run_dir, run_name
        self.best_name = MODELS[args.model][1]
        self.best_acc, self.best = best_acc, None  # best: the weights chosen by this process, if any
        self.every_s, self.last_save = args.checkpoint_every * 60, time.monotonic()
        self.writer = CheckpointWriter()

    def raise_if_write_failed(self):
        """A failed background write stops the run at the next loss check, not at the next save."""
        self.writer.raise_if_failed()

    def due(self):
        """Whether a periodic mid-epoch save of last.pth is due (--checkpoint-every)."""
        return self.every_s > 0 and time.monotonic() - self.last_save >= self.every_s

    def choose(self, epoch, val_acc):
        """Whether the weights after ``epoch`` (1-based) are the best so far. The first validation
        always is, even at 0% (tiny runs): a run always has a best checkpoint."""
        is_best = val_acc > self.best_acc or epoch == min(self.args.val_every, self.args.epochs)
        self.best_acc = max(self.best_acc, val_acc)
        if is_best:  # kept for the test by every rank: none reads a file only rank 0 wrote
            self.best = {"state_dict": to_host(self.model.state_dict()), "epoch": epoch,
                         "best_val_acc": self.best_acc}
        return is_best

    def save(self, epoch, step, meter, is_best=False):
        """last.pth (and the best when ``is_best``): at ``step`` of epoch ``epoch`` (0-based), or at
        the end of epoch ``epoch`` (1-based) when ``step`` is 0."""
        if not engine.parameters_finite(self.model):
            where = f"epoch {epoch}, by its last step" if step == 0 else f"epoch {epoch + 1}, by step {step}"
            raise UserError(f"the weights became non-finite in {where}; stopped, the last good checkpoint is kept")
        if self.rt.master:
            self.writer.save({
                "model": self.model_cfg, "image_size": self.args.image_size, "classes": self.classes,
                "state_dict": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": epoch, "step": step,
                "meter": meter.local(), "best_val_acc": self.best_acc, "args": vars(self.args),
                "run_name": self.run_name, "versions": versions(), "rng_state": torch.get_rng_state(),
            }, is_best, self.run_dir, self.best_name)
        self.last_save = time.monotonic()

    def best_weights(self):
        """For the final test: the best checkpoint this process chose, or rank 0's file sent to every
        rank (a resumed run whose best came before the resume)."""
        if self.best is None:
            path = os.path.join(self.run_dir, self.best_name)
            self.best = broadcast(load_checkpoint(path) if self.rt.master else None)
        return self.best

    def stop(self, epoch, step, meter, signum, where, log):
        """A stop signal: last.pth at ``step`` of ``epoch``, complete on disk before the process
        exits, and the line that says how to resume. -> the exit code (128 + the signal)."""
        self.save(epoch, step, meter)
        self.wait()
        log.info(f"stopped by {signal.Signals(signum).name} {where}; saved {self.run_dir}/last.pth. "
                 f"Resume with: python train.py --resume {self.run_dir}/last.pth")
        return 128 + signum

    def check_room(self):
        """Before the first step: room on --out's disk for the best, last.pth and a temporary copy."""
        if self.rt.master:
            check_room(self.run_dir, self.best_name, checkpoint_bytes(self.model, self.args.optimizer))

    def wait(self):
        self.writer.wait()


# ----------------------------------------------------------------------------------------------
# A run's folder


def run_folder(args, ckpt, master):
    """-> (run name, its checkpoint folder): the resumed run's, or a new one claimed by rank 0 and
    sent to every rank."""
    if ckpt:
        return ckpt["run_name"], os.path.dirname(os.path.abspath(args.resume))
    name = broadcast(new_run_name(args.model, args.run_name, args.overwrite, args.out, args.log_dir,
                                  [m[1] for m in MODELS.values()]) if master else None)
    run_dir = os.path.join(args.out, name)
    if master:
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {run_dir}: {e.strerror or e}") from None
    return name, run_dir


def new_run_name(model, run_name, overwrite, out, log_dir, best_names):
    """A name no other run has, claimed by creating its checkpoint folder (two runs started in the
    same second must not both take it), unless ``run_name`` with ``overwrite`` asks to reuse one."""
    base = run_name or f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"
    logs = lambda n: [os.path.join(log_dir, n + end) for end in (".log", ".csv", ".png", "-confusion.png")]
    if run_name and overwrite:
        # start afresh: the old run's rows would mix into the new CSV and curves, and its
        # checkpoints would pass for the new run's until replaced
        for path in logs(base) + [os.path.join(out, base, n) for n in [LAST] + list(best_names)]:
            if os.path.exists(path):
                os.remove(path)
        os.makedirs(os.path.join(out, base), exist_ok=True)
        return base
    name, k = base, 1
    while True:
        if not any(map(os.path.exists, logs(name))):
            with contextlib.suppress(FileExistsError):
                os.makedirs(os.path.join(out, name))  # atomic: fails if another run has it
                return name
        if run_name:
            raise UserError(f"run {base} exists (in {out} or {log_dir}); pick another "
                            f"--run-name, or add --overwrite", exit_code=2)
        k += 1
        name = f"{base}-{k}"


# ----------------------------------------------------------------------------------------------
# Writing without stalling training


def to_host(obj):
    """A copy of ``obj`` whose tensors are CPU clones: training may change the originals at once."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


class CheckpointWriter:
    """``save_checkpoint`` in a background thread: the state is first copied to host memory (the
    only part training waits for), then written with the same atomic rename. One write at a time:
    a new save, ``wait`` and ``close`` first wait for the previous write, and re-raise its error
    (a UserError: the checkpoints before it are intact)."""

    def __init__(self, background=True):
        self.background, self.thread, self.error = background, None, None

    def save(self, state, is_best, run_dir, best_name):
        self.wait()
        state = to_host(state)
        if not self.background:
            return save_checkpoint(state, is_best, run_dir, best_name)
        self.thread = threading.Thread(target=self._write, args=(state, is_best, run_dir, best_name),
                                       name="checkpoint-writer", daemon=False)
        self.thread.start()

    def _write(self, *args):
        try:
            save_checkpoint(*args)
        except BaseException as e:  # re-raised in the training thread by wait()
            self.error = e

    def raise_if_failed(self):
        """Re-raise a finished write's error now (the training loop asks between steps)."""
        if self.thread is not None and not self.thread.is_alive():
            self.wait()

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error
