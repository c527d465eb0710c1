"""A trained network outside this repo's Python: ONNX (run by ONNX Runtime) and torch.export.

Both take what the PyTorch network takes (timm's convention): a float32 batch (N, 3, S, S), resized
to the run's image size S and normalised with its mean and std (data.eval_transform), and return
the logits (N, classes); the batch size is free. What a user of the file needs besides the
weights travels in it: the model's name, S, mean, std, the class names, the run's name, epoch and
test accuracy, and the settings and split seed evaluate.py uses to test it on the same images.

    ONNX          metadata_props, each a string (JSON for lists and dicts); opset ONNX_OPSET,
                  exported with torch.onnx.export(dynamo=True), checked with
                  onnx.checker.check_model(full_check=True)
    torch.export  an ExportedProgram (.pt2, torch.export.save), the same fields in its extra
                  file "meta.json"

``load_onnx`` / ``load_program`` give (network, info) like checkpoints.load_model, so evaluate.py
runs one evaluation path for a checkpoint, a release file and an ONNX file. onnx and onnxruntime
are optional (requirements-export.txt): without them only the ONNX parts say what to install.
"""
import contextlib
import json
import os

import numpy as np
import torch

import data
from report import run_settings
from utils import UserError, atomic_path, first_line

ONNX_OPSET = 18
INPUT, OUTPUT = "input", "logits"
# Largest |logit difference| accepted between PyTorch (float32) and the exported file on the same
# batch: float32 kernels in another order differ by ~1e-5 on logits of size ~10; 1e-3 leaves room
# for a deep network and catches any real difference (a wrong op changes logits by far more).
TOLERANCE = 1e-3
EXPORT_PIP = "pip install -r requirements-export.txt"
META_FIELDS = ("model", "image_size", "mean", "std", "classes", "run_name", "epoch", "test_acc", "args")


def require_onnx():
    """(onnx, onnxruntime), or a one-line UserError naming what to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise UserError(f"ONNX needs the onnx, onnxscript and onnxruntime packages ({e.name} is missing): "
                        f"{EXPORT_PIP}", exit_code=2) from None
    return onnx, onnxruntime


def metadata(info):
    """The fields a file carries about its network (``info``: checkpoints.load_model's)."""
    return {"model": info["name"], "image_size": info["image_size"], "mean": list(data.MEAN), "std": list(data.STD),
            "classes": list(info["classes"]), "run_name": info["run_name"], "epoch": info["epoch"],
            "test_acc": info.get("test_acc"), "args": {**run_settings(info["args"]), "seed": info["args"]["seed"],
                                                       "split_seed": info["args"].get("split_seed")}}


def info_from(meta, path):
    """load_model's ``info`` from a file's metadata, checked; a one-line UserError otherwise."""
    bad = lambda why: UserError(f"{path} was not exported by this project's export.py ({why})")
    if not isinstance(meta, dict) or [k for k in META_FIELDS if k not in meta]:
        raise bad("its metadata lacks " + ", ".join(k for k in META_FIELDS if not isinstance(meta, dict) or k not in meta))
    size, classes, args = meta["image_size"], meta["classes"], meta["args"]
    if not (isinstance(size, int) and 0 < size <= 4096 and isinstance(classes, list) and len(classes) >= 2
            and all(isinstance(c, str) for c in classes) and isinstance(args, dict)
            and isinstance(args.get("seed"), int) and isinstance(args.get("val_split"), int)):
        raise bad("its image size, classes or split are not of their types")
    if meta["mean"] != list(data.MEAN) or meta["std"] != list(data.STD):
        raise bad("its mean/std are not the normalisation this code applies")
    return {"name": meta["model"], "classes": classes, "image_size": size, "epoch": meta["epoch"],
            "best_val_acc": None, "run_name": meta["run_name"], "args": args, "test_acc": meta["test_acc"],
            "transform": data.eval_transform(size)}


def example_batch(info, n=2, seed=0):
    """A batch of the network's input: normal noise (what normalised images look like, roughly)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, info["image_size"], info["image_size"], generator=g)


@contextlib.contextmanager
def written_atomically(path):
    """utils.atomic_path, with a write error (disk full, read-only) as one line."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"cannot write {path}: {folder} is not a folder", exit_code=2)
    try:
        with atomic_path(path) as tmp:
            yield tmp
    except OSError as e:
        raise UserError(f"could not write {path}: {e.strerror or e}; nothing was written") from None


# ----------------------------------------------------------------------------------------------
# ONNX


def export_onnx(model, info, path):
    """The network as ONNX with a dynamic batch axis, its metadata, checked, written atomically."""
    onnx, _ = require_onnx()
    dynamic = ({0: torch.export.Dim("batch")},)
    with torch.no_grad(), contextlib.redirect_stdout(open(os.devnull, "w")):  # the exporter's progress lines
        program = torch.onnx.export(model.eval(), (example_batch(info),), dynamo=True, opset_version=ONNX_OPSET,
                                    input_names=[INPUT], output_names=[OUTPUT], dynamic_shapes=dynamic,
                                    verbose=False)
    proto = program.model_proto
    for key, value in metadata(info).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # onnx's checker raises its own ValidationError and friends
        raise UserError(f"the exported ONNX graph fails onnx.checker ({type(e).__name__}: {first_line(e)})") from None
    with written_atomically(path) as tmp:
        onnx.save(proto, tmp)


class OnnxNetwork:
    """An ONNX Runtime session that engine.evaluate and evaluate.py can call like the network:
    a torch batch in, torch logits out (on the CPU)."""

    def __init__(self, session):
        self.session = session

    def __call__(self, x):
        batch = np.ascontiguousarray(x.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: batch})[0])

    def eval(self):
        return self


def load_onnx(path):
    """-> (OnnxNetwork, info) of an ONNX file export.py wrote; anything else is a one-line UserError."""
    onnx, ort = require_onnx()
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist")
    try:
        proto = onnx.load(path, load_external_data=False)
        meta = {p.key: json.loads(p.value) for p in proto.metadata_props if p.key in META_FIELDS}
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:  # protobuf's DecodeError, ORT's failures, JSON errors: all "not ours"
        raise UserError(f"{path} is not a readable ONNX file ({type(e).__name__}: {first_line(e)})") from None
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if names != ([INPUT], [OUTPUT]):
        raise UserError(f"{path} was not exported by this project's export.py (inputs/outputs {names})")
    return OnnxNetwork(session), info_from(meta, path)


# ----------------------------------------------------------------------------------------------
# torch.export


def export_program(model, info, path):
    """The network as a torch.export ExportedProgram (.pt2) with a dynamic batch, written atomically."""
    dynamic = ({0: torch.export.Dim("batch")},)
    with torch.no_grad():
        program = torch.export.export(model.eval(), (example_batch(info),), dynamic_shapes=dynamic)
    with written_atomically(path) as tmp:
        torch.export.save(program, tmp, extra_files={"meta.json": json.dumps(metadata(info))})


def load_program(path):
    """-> (the program's module, info) of a .pt2 file export.py wrote."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist")
    extra = {"meta.json": ""}
    try:
        program = torch.export.load(path, extra_files=extra)
        meta = json.loads(extra["meta.json"] or "null")
    except Exception as e:  # a damaged zip, a file of another torch version, not JSON: one line
        raise UserError(f"{path} is not a readable torch.export file ({type(e).__name__}: {first_line(e)})") from None
    return program.module(), info_from(meta, path)


def max_abs_difference(reference, other, x):
    """Largest |logit difference| between two networks on the batch ``x``."""
    with torch.no_grad():
        return float((reference(x).float() - other(x).float()).abs().max())
