"""Reading a torch file that anyone may have handed us (a checkpoint, a weights file): through
``torch.load(weights_only=True)``, which runs no code from the file, with every failure one line.

The lowest room that touches torch files: ``models`` (weights files) and ``checkpoints`` (the
checkpoint format) both read through it, and it imports neither.
"""
import os
import pickle
import re
import warnings
import zipfile

import torch

from utils import UserError, first_line


def safe_load(path, what="checkpoint"):
    """torch.load with weights_only=True; every failure becomes a one-line UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist")
    try:
        with warnings.catch_warnings():  # about the file's content (a raw pickle's protocol, sparse
            warnings.simplefilter("ignore")  # tensors, ...), which the callers check themselves
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = re.search(r"GLOBAL (\S+)", str(e), re.IGNORECASE)
        if not blocked:  # an opcode torch.save never writes: a text file, a raw pickle, garbage
            raise UserError(f"{what} {path} is not a PyTorch file (torch.load cannot read it)") from None
        raise UserError(f"{what} {path} was refused by torch.load(weights_only=True): it holds more than "
                        f"tensors and plain types ({blocked.group(1)}), so it is not loaded") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise UserError(f"{what} {path} is truncated or not a PyTorch file ({first_line(e)})") from None
    except Exception as e:
        # torch's weights-only unpickler runs whatever opcodes the file holds against its stack and
        # memo without checking them first: a text file ("hi" reads as BINGET 105), random bytes or
        # a damaged torch.save file raise KeyError, IndexError, struct.error, TypeError,
        # AssertionError, MemoryError, ... Any of them means the file is not a loadable PyTorch file.
        raise UserError(f"{what} {path} is damaged or not a PyTorch file (torch.load: "
                        f"{type(e).__name__}: {first_line(e)})") from None


def plain_tensor(value):
    """A dense, real-valued CPU tensor: what a state_dict holds (``map_location="cpu"`` moves CUDA
    tensors; meta, sparse, quantized and complex tensors cannot be copied into a network's weights)."""
    return (torch.is_tensor(value) and value.layout == torch.strided and value.device.type == "cpu"
            and not value.is_quantized and not value.is_complex())
