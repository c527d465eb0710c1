"""Small shared pieces: the user-facing error, safe checkpoint files, versions, torch.distributed."""
import glob
import os
import pickle
import platform
import re
import signal
import sys
import warnings
import zipfile

import torch


class UserError(Exception):
    """A problem with the user's input or files: reported as one line, exit code 1 (2 for usage)."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


def run_cli(main):
    """Call ``main()``; a UserError becomes one line on stderr and a non-zero exit."""
    try:
        return main()
    except UserError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # ^C before training starts, or a second ^C: nothing to save
        print(f"{os.path.basename(sys.argv[0])}: interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


# ----------------------------------------------------------------------------------------------
# Checkpoint files


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


def versions():
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(__import__("torchvision").__version__)}


# ----------------------------------------------------------------------------------------------
# torch.distributed (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE)


def setup_distributed(device):
    """-> (rank, local_rank, world_size, device). A single process when not under torchrun."""
    if "RANK" not in os.environ:
        return 0, 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, local_rank, world_size, device


def all_reduce_sum(values, device):
    """Sum a list of numbers over all ranks (identity without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()
