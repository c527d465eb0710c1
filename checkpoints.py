"""The checkpoint format, in one place: what a checkpoint holds, how it is written (atomically), how
any file a user hands us is loaded (safely), and how a network is rebuilt from a checkpoint alone.

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
import contextlib
import glob
import os
import pickle
import re
import threading
import time
import warnings
import zipfile

import torch

import data
from utils import UserError

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


def safe_load(path, what="checkpoint"):
    """torch.load with weights_only=True; every failure becomes a one-line UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist")
    try:
        with warnings.catch_warnings():  # a raw pickle warns of its protocol before it is refused
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = re.search(r"GLOBAL (\S+)", str(e), re.IGNORECASE)
        if not blocked:  # an opcode torch.save never writes: a text file, a raw pickle, garbage
            raise UserError(f"{what} {path} is not a PyTorch file (torch.load cannot read it)") from None
        raise UserError(f"{what} {path} was refused by torch.load(weights_only=True): it holds more than "
                        f"tensors and plain types ({blocked.group(1)}), so it is not loaded") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} {path} is truncated or not a PyTorch file ({first})") from None


# ----------------------------------------------------------------------------------------------
# The format


def load_checkpoint(path):
    """A checkpoint of this project, through torch.load(weights_only=True), or a UserError."""
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict):
        problem = f"a {type(ckpt).__name__}, not a dict"
    elif [k for k in KEYS if k not in ckpt]:
        problem = "no " + ", ".join(k for k in KEYS if k not in ckpt)
    elif not (isinstance(ckpt["model"], dict) and set(MODEL_RECORD) <= ckpt["model"].keys()
              and isinstance(ckpt["state_dict"], dict) and isinstance(ckpt["args"], dict)):
        problem = f"its model record is not {{{', '.join(MODEL_RECORD)}}} or its state_dict/args not dicts"
    else:
        return ckpt
    raise UserError(f"{path} is not a checkpoint of this project ({problem}); train.py writes them")


def save_checkpoint(state, is_best, run_dir, best_name):
    """last.pth always; a copy under the model's own name when it is the best so far."""
    for name in [LAST] + ([best_name] if is_best else []):
        path = os.path.join(run_dir, name)
        try:
            atomic_save(state, path)
        except OSError as e:
            raise UserError(f"could not write checkpoint {path}: {e}; the checkpoints saved "
                            f"before are intact") from None


def model_from_checkpoint(ckpt, path):
    """Rebuild the checkpoint's network from its own record, without flags or weights files."""
    from models import build_model  # models imports this module (safe_load) for weights files
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


def load_model(path, device="cpu"):
    """-> (network in eval mode on ``device``, info): the user's way to use a checkpoint from Python.

    ``info``: name, classes, image_size, epoch, best_val_acc, run_name, and ``transform``, which
    turns an RGB PIL image into the network's input as evaluation does."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path).to(device).eval()
    info = {"name": ckpt["model"]["name"], "classes": list(ckpt["classes"]), "image_size": ckpt["image_size"],
            "epoch": ckpt["epoch"], "best_val_acc": ckpt["best_val_acc"], "run_name": ckpt["run_name"],
            "args": ckpt["args"], "transform": data.eval_transform(ckpt["image_size"])}
    return model, info


# ----------------------------------------------------------------------------------------------
# A run's folder


def new_run_name(model, run_name, overwrite, out, log_dir, best_names):
    """A name no other run has, claimed by creating its checkpoint folder (two runs started in the
    same second must not both take it), unless ``run_name`` with ``overwrite`` asks to reuse one."""
    base = run_name or f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"
    logs = lambda n: [os.path.join(log_dir, f"{n}.{ext}") for ext in ("log", "csv", "png")]
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

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error
