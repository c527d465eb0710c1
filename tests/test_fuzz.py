"""Issue 14: whatever a file holds, the commands answer it with one line, never a traceback.

Seeded generators (deterministic: case ``i`` of a family is built from ``random.Random(f"{family}/{i}")``)
make every kind of file a user can hand the commands, and give each to the functions that read it,
in-process:

  checkpoints / weights  random bytes, pickle-opcode soup, torch.save of random plain objects, byte
                         flips, splices and truncations of a real train.py checkpoint (zip and legacy
                         format), that checkpoint with fields replaced, deleted, swapped or reshaped,
                         and random {state_dict, meta} weights files; each goes to
                         checkpoints.load_model, to what evaluate.py and train.py --resume do with a
                         checkpoint (``evaluate_like``, ``resume_like_train``, up to the first training
                         step) and to models.load_resnet50_state
  images                 valid images of every mode, format and size (they must classify), broken
                         ones, decompression bombs, strips -> evaluate.predict
  CIFAR-10 folders       entries real, missing, folders, random, truncated, of the right size ->
                         data.load_cifar10

Every case must succeed or raise UserError with a one-line message; any other exception fails the
test, naming the case (its family and index rebuild it: ``case_rng``). CI runs the ``ci`` share
(1,130 cases, ~25 s of CPU); ``-m slow`` adds ~11,000 other cases. A few end-to-end runs
check the same through the real command lines (one stderr line, non-zero exit, no traceback).
"""
import collections
import io
import logging
import math
import os
import pickle
import pickletools
import random
import struct
import traceback
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import data
import engine
import evaluate
import models
import train
from conftest import run_script
from utils import StopSignals, UserError, setup_runtime

# cases per family: (CI, slow). Together more than 10,000; CI's share stays well under a minute.
SIZES = {
    "ckpt-random-bytes": (150, 1500),
    "ckpt-pickle-soup": (200, 2000),
    "ckpt-plain-objects": (100, 1000),
    "ckpt-byte-flips": (100, 1500),
    "ckpt-splices": (50, 600),
    "ckpt-truncations": (50, 600),
    "ckpt-fields": (100, 1500),
    "weights-objects": (100, 600),
    "images": (250, 1500),
    "cifar-folders": (30, 400),
}
SCALES = [pytest.param(0, id="ci"), pytest.param(1, id="slow", marks=pytest.mark.slow)]
ENV = {"OMP_NUM_THREADS": "1"}


def case_range(family, scale):
    """The CI share is cases 0..n_ci-1; the slow share the next n_slow: no case runs twice."""
    n_ci, n_slow = SIZES[family]
    return range(n_ci) if scale == 0 else range(n_ci, n_ci + n_slow)


def case_rng(family, i):
    return random.Random(f"{family}/{i}")


class Outcomes:
    """Runs readers on cases: each must return or raise a one-line UserError. Collects the rest."""

    def __init__(self, family):
        self.family, self.counts, self.failures = family, collections.Counter(), []

    def run(self, i, what, reader, expect=None):
        """-> 'ok' or 'error'; anything else is recorded as a failure of case ``i``."""
        try:
            reader()
            got = "ok"
        except UserError as e:
            got = "error"
            message = str(e)
            if not message.strip() or len(message.splitlines()) != 1:
                self.fail(i, what, f"UserError of {len(message.splitlines())} lines: {message!r}")
        except Exception:
            self.fail(i, what, traceback.format_exc(limit=-8))
            return "exception"
        if expect and got != expect:
            self.fail(i, what, f"expected {expect}, got {got}")
        self.counts[f"{what}: {got}"] += 1
        return got

    def fail(self, i, what, detail):
        self.failures.append(f"{self.family} case {i} ({what}): {detail}")

    def check(self, n):
        print(f"{self.family}: {n} cases; " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())))
        assert not self.failures, (f"{len(self.failures)} failures of {n} cases; the first:\n\n"
                                   + "\n\n".join(self.failures[:5]))


# ----------------------------------------------------------------------------------------------
# The real checkpoint, and stand-ins for CIFAR-10 in what train.py and evaluate.py do with it


class Base:
    """A tiny train.py run's last.pth: its bytes (zip and legacy format), its dict, and the zip's
    regions worth aiming at (the pickle, the local headers, the central directory)."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self.zip_bytes = f.read()
        self.ckpt = torch.load(path, map_location="cpu", weights_only=True)
        buf = io.BytesIO()
        torch.save(self.ckpt, buf, _use_new_zipfile_serialization=False)
        self.legacy_bytes = buf.getvalue()
        self.regions = {"pickle": [], "headers": [], "directory": []}
        with zipfile.ZipFile(io.BytesIO(self.zip_bytes)) as z:
            infos = z.infolist()
            self.regions["directory"].append((min(max(i.header_offset for i in infos) + 1, len(self.zip_bytes) - 1),
                                              len(self.zip_bytes)))
            for info in infos:
                start = info.header_offset
                name_len, extra_len = struct.unpack("<HH", self.zip_bytes[start + 26:start + 30])
                data_start = start + 30 + name_len + extra_len
                self.regions["headers"].append((start, data_start))
                if info.filename.endswith(".pkl"):
                    self.regions["pickle"].append((data_start, data_start + info.file_size))
        self.model, self.info = checkpoints.load_model(path)


@pytest.fixture(scope="session")
def base(tmp_path_factory, cifar_root):
    """One tiny train.py run (its real format), read once per session."""
    d = tmp_path_factory.mktemp("fuzz_run")
    res = run_script("train.py", "--model", "sample_resnet", "--image-size", "32", "--epochs", "1",
                     "--train-subset", "32", "--batch-size", "16", "--val-split", "100", "--test-subset", "32",
                     "--out", d / "ck", "--log-dir", d / "log", "--run-name", "f", "--no-download",
                     "--device", "cpu", "--data-dir", cifar_root, env=ENV)
    assert res.returncode == 0, res.stderr
    return Base(str(d / "ck" / "f" / "last.pth"))


def fake_cifar10(root="cifar", download=True):
    """CIFAR-10's shape at 1/50 of its size (1,000 training, 100 test images, balanced labels):
    what train.py and evaluate.py do with a checkpoint's arguments, without reading 180 MB a case."""
    train_y, test_y = np.arange(1000) % 10, np.arange(100) % 10
    return (np.zeros((1000, 32, 32, 3), np.uint8), train_y.astype(np.int64),
            np.zeros((100, 32, 32, 3), np.uint8), test_y.astype(np.int64))


@pytest.fixture
def fake_data(monkeypatch):
    monkeypatch.setattr(data, "load_cifar10", fake_cifar10)


def evaluate_like(path):
    """evaluate.py's main with a checkpoint, short of the forward pass: load_model, then the test
    split from the run's own arguments."""
    model, info = checkpoints.load_model(path)
    args = evaluate.parse_args([path, "--data-dir", "cifar", "--no-download"])
    assert len(evaluate.test_loader(args, info, "cpu")) > 0
    assert len(info["classes"]) == 10 and callable(info["transform"])


def resume_like_train(path):
    """train.py --resume up to and including its first training step, through train.py's own
    functions (on ``fake_cifar10``; DataLoader workers 0): the arguments, the network, the loaders,
    the optimizer and schedule, the meter and the RNG state restored from the checkpoint."""
    args, ckpt = train.parse_args(["--resume", path])
    args.workers = 0
    model = checkpoints.model_from_checkpoint(ckpt, path).to(memory_format=torch.channels_last)
    rt = setup_runtime("cpu", distributed=False)
    with torch.random.fork_rng(devices=[]):
        loaders, net, _ = train.make_loaders(args, model, rt, logging.getLogger("fuzz"), StopSignals())
        optimizer, scheduler, criterion, (epoch, step, _, meter_state) = engine.make_optimisation(
            args, model, len(loaders["train"]), ckpt)
        meter = engine.Meter("cpu", **meter_state)
        if epoch < args.epochs:
            loaders["train"].set_epoch(epoch, step)
            for x, y in loaders["train"]:
                engine.train_step(net, x, y, criterion, optimizer, scheduler, rt.autocast, meter)
                break


class Readers:
    """Every reader of a torch file, run on one case; ResNet-50 is built a limited number of times."""

    def __init__(self, outcomes, backbones):
        self.outcomes, self.backbones = outcomes, backbones

    def __call__(self, i, path):
        if self.outcomes.run(i, "load_model", lambda: checkpoints.load_model(path)) == "ok":
            self.outcomes.run(i, "evaluate", lambda: evaluate_like(path))
            self.outcomes.run(i, "resume", lambda: resume_like_train(path))
        self.weights(i, path)

    def weights(self, i, path):
        if self.outcomes.run(i, "weights", lambda: models.load_resnet50_state(path)) == "ok" and self.backbones > 0:
            self.backbones -= 1  # ~0.3 s each: the state_dict checks above decide what reaches it
            self.outcomes.run(i, "backbone", lambda: models.resnet50_backbone(path))


# ----------------------------------------------------------------------------------------------
# Values and mutations


def deep_list(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


def junk(rng):
    """A value of any plain type torch.save keeps, or a tensor of an odd kind."""
    pool = [
        None, True, False, 0, 1, -1, 3, 10, 2**31, 2**64, -2**70, 10**100, 0.5, -0.0, math.nan, math.inf, -math.inf,
        "", "x", "resnet", "sample_resnet", "10", "0.1", "a\0b", "line\nbreak", "\u2028", b"bytes", bytearray(b"ba"),
        [], [1, 2, 3], ["a"] * 3, list(data.CLASSES)[:3], list(data.CLASSES) + ["extra"], (), (1.0,), (1, "a"),
        {}, {"a": 1}, {1: 2}, {"state": {}, "param_groups": []}, {1, 2}, complex(1, 2), deep_list(400),
        torch.tensor(1.0), torch.zeros(3), torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(5056, dtype=torch.uint8),
        torch.zeros(0), torch.zeros(2, device="meta"), torch.zeros(3).to_sparse(),
        torch.zeros(2, dtype=torch.complex64),
        torch.zeros(1).expand(10**6), torch.tensor([True, False]), torch.tensor(7),
    ]
    return rng.choice(pool)


def tweak(rng, value):
    """A nearby value of the same kind: a reshaped tensor, a number off by a little or a lot, ..."""
    if torch.is_tensor(value):
        options = [lambda: value.flatten(), lambda: value[:-1] if value.dim() else value[None],
                   lambda: value.unsqueeze(0), lambda: value.to(torch.half), lambda: value.to(torch.int64),
                   lambda: value.bool(), lambda: value.to(torch.complex64),
                   lambda: torch.empty_like(value, device="meta"),
                   lambda: value.transpose(0, -1) if value.dim() else value, lambda: torch.cat([value.flatten()] * 2),
                   lambda: value.to_sparse() if value.dim() else value, lambda: value.float().fill_(math.nan)]
        return rng.choice(options)()
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1, -value, value * 1000, 0, -1, 2**63, float(min(value, 2**1000))])
    if isinstance(value, float):
        return rng.choice([-value, value * 1e6, math.nan, math.inf, 0.0, int(value) if math.isfinite(value) else 0,
                           str(value)])
    if isinstance(value, str):
        return rng.choice(["", value + "x", value.upper(), value[:1], value + "\0", value * 3])
    if isinstance(value, (list, tuple)):
        items = list(value)
        if items and rng.random() < 0.5:
            del items[rng.randrange(len(items))]
        else:
            items.append(items[0] if items and rng.random() < 0.5 else junk(rng))
        return type(value)(items)
    if isinstance(value, dict):
        value = dict(value)
        if value and rng.random() < 0.5:
            del value[rng.choice(list(value))]
        else:
            value[rng.choice(["x", 0, "state", "lr"])] = junk(rng)
        return value
    return junk(rng)


def copy_structure(obj):
    """Copies of the dicts and lists; tensors shared (mutations build new ones, never change them)."""
    if isinstance(obj, dict):
        return {k: copy_structure(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [copy_structure(v) for v in obj]
    return obj


def slots(rng, ckpt):
    """(container, key) places in a checkpoint, one family of places chosen at random."""
    def entries(obj):
        if isinstance(obj, dict):
            return [(obj, k) for k in obj]
        if isinstance(obj, list):
            return [(obj, k) for k in range(len(obj))]
        return []
    families = [entries(ckpt)]
    for key in ("model", "args", "meter", "scheduler", "classes", "optimizer"):
        families.append(entries(ckpt.get(key)))
    opt = ckpt.get("optimizer")
    if isinstance(opt, dict):
        for key in ("param_groups", "state"):
            families += [entries(opt.get(key))] + [entries(c[k]) for c, k in entries(opt.get(key))[:1]]
    sd = ckpt.get("state_dict")
    if isinstance(sd, dict) and sd:
        families.append(rng.sample(entries(sd), min(5, len(sd))))
    families = [f for f in families if f]
    return rng.choice(families)


def mutate_fields(rng, ckpt):
    """1-3 of: replace a field by junk, tweak it, delete it, swap two fields' values, add a key."""
    ckpt = copy_structure(ckpt)
    done = []
    for _ in range(rng.randint(1, 3)):
        container, key = rng.choice(slots(rng, ckpt))
        op = rng.choices(["junk", "tweak", "delete", "swap", "add"], [4, 4, 2, 1, 1])[0]
        if op == "junk":
            container[key] = junk(rng)
        elif op == "tweak":
            container[key] = tweak(rng, container[key])
        elif op == "delete" and isinstance(container, dict):
            del container[key]
        elif op == "swap":
            other, other_key = rng.choice(slots(rng, ckpt))
            container[key], other[other_key] = other[other_key], container[key]
        elif op == "add" and isinstance(container, dict):
            container[rng.choice(["extra", 0, ("t",), "lr", "epoch"])] = junk(rng)
        done.append(f"{op} {key!r}")
    return ckpt, done


# ----------------------------------------------------------------------------------------------
# Bytes


LEGACY_HEADER = b"".join(pickle.dumps(x, protocol=2) for x in (
    0x1950a86a20f9469cfc6c, 1001, {"protocol_version": 1001, "little_endian": True,
                                    "type_sizes": {"short": 2, "int": 4, "long": 4}}))
OPCODES = [op for op in pickletools.opcodes]


def random_bytes(rng, n=None):
    n = rng.choice([rng.randint(0, 16), rng.randint(16, 512), rng.randint(512, 20000)]) if n is None else n
    return rng.randbytes(n)


def gen_random_bytes(rng, base):
    prefix = rng.choice([b"", b"", b"PK\x03\x04", b"PK\x05\x06", b"\x80\x02", b"\x80\x05", LEGACY_HEADER,
                         b"hi\n", b"{\n", b"\x89PNG\r\n\x1a\n", base.zip_bytes[:rng.randint(0, 200)]])
    return prefix + random_bytes(rng)


def small_int_bytes(rng, n):
    """Little-endian n bytes, mostly a small number (a memo index, a length that fits the file)."""
    if n == 8:  # FRAME lengths, BINBYTES8/BINUNICODE8 lengths: small, or absurd
        return struct.pack("<Q", rng.choice([rng.randint(0, 64), 2**63 - 1, 2**40]))
    if rng.random() < 0.8:
        return rng.randint(0, min(255, 2 ** (8 * n) - 1)).to_bytes(n, "little")
    return rng.randbytes(n)


def gen_pickle_soup(rng, base):
    """Random pickle opcodes with arguments of their own shape, after a protocol header (and
    sometimes the legacy torch.save header, which sends the soup into the legacy loader)."""
    out = [rng.choice([b"", LEGACY_HEADER, b"\x80\x02", b"\x80\x04", b"\x80\x05"])]
    for _ in range(rng.randint(1, 40)):
        op = rng.choice(OPCODES)
        out.append(op.code.encode("latin-1"))
        n = op.arg.n if op.arg else 0
        if n > 0:
            out.append(small_int_bytes(rng, n))
        elif n == pickletools.UP_TO_NEWLINE:
            out.append(rng.choice([b"0", b"1.5", b"'a'", b"builtins", b"torch", b"x" * rng.randint(0, 9),
                                   rng.randbytes(3)]) + b"\n")
        elif n in (pickletools.TAKEN_FROM_ARGUMENT1, pickletools.TAKEN_FROM_ARGUMENT4,
                   pickletools.TAKEN_FROM_ARGUMENT4U, pickletools.TAKEN_FROM_ARGUMENT8U):
            size = {pickletools.TAKEN_FROM_ARGUMENT1: 1, pickletools.TAKEN_FROM_ARGUMENT8U: 8}.get(n, 4)
            length = rng.choice([rng.randint(0, 8), 2 ** (8 * size - 1) - 1])
            out.append(length.to_bytes(size, "little") + rng.randbytes(min(length, 8)))
    if rng.random() < 0.7:
        out.append(b".")
    return b"".join(out)


def plain_object(rng, depth=0):
    kind = rng.choice(["junk", "dict", "list", "tensor"] if depth < 3 else ["junk", "tensor"])
    if kind == "dict":
        keys = list(checkpoints.KEYS) + ["meta", "state_dict", "x", 0]
        return {rng.choice(keys): plain_object(rng, depth + 1) for _ in range(rng.randint(0, 6))}
    if kind == "list":
        return [plain_object(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == "tensor":
        return torch.randn([rng.randint(0, 3) for _ in range(rng.randint(0, 3))])
    return junk(rng)


def gen_plain_objects(rng, base):
    """torch.save of random plain objects: readable files that hold anything but a checkpoint,
    sometimes a dict with every checkpoint key (random values) or the real checkpoint's keys."""
    obj = plain_object(rng)
    if rng.random() < 0.3:
        obj = {k: plain_object(rng, 2) for k in checkpoints.KEYS}
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=rng.random() < 0.8)
    return buf.getvalue()


def position(rng, base, data_bytes):
    if data_bytes is base.zip_bytes and rng.random() < 0.8:
        start, end = rng.choice(base.regions[rng.choices(["pickle", "headers", "directory"], [5, 2, 2])[0]])
        return rng.randrange(start, max(end, start + 1))
    if data_bytes is base.legacy_bytes and rng.random() < 0.7:
        return rng.randrange(min(len(data_bytes), 4000))  # the pickles ahead of the tensor data
    return rng.randrange(len(data_bytes))


def gen_byte_flips(rng, base):
    src = rng.choice([base.zip_bytes, base.zip_bytes, base.legacy_bytes])
    out = bytearray(src)
    for _ in range(rng.choice([1, 1, 2, 3, 8])):
        i = position(rng, base, src)
        out[i] = rng.choice([out[i] ^ (1 << rng.randrange(8)), rng.randrange(256), 0, 255, (out[i] + 1) % 256])
    return bytes(out)


def gen_splices(rng, base):
    src = rng.choice([base.zip_bytes, base.zip_bytes, base.legacy_bytes])
    i = position(rng, base, src)
    j = min(len(src), i + rng.randint(1, 64))
    return rng.choice([src[:i] + src[j:], src[:i] + rng.randbytes(rng.randint(1, 16)) + src[i:],
                       src[:j] + src[i:j] + src[j:], src[:i] + src[j:] + src[i:j]])


def gen_truncations(rng, base):
    src = rng.choice([base.zip_bytes, base.zip_bytes, base.legacy_bytes])
    cut = position(rng, base, src) if rng.random() < 0.6 else rng.randrange(len(src))
    return src[:cut] + (rng.randbytes(rng.randint(1, 100)) if rng.random() < 0.3 else b"")


BYTE_FAMILIES = {"ckpt-random-bytes": gen_random_bytes, "ckpt-pickle-soup": gen_pickle_soup,
                 "ckpt-plain-objects": gen_plain_objects, "ckpt-byte-flips": gen_byte_flips,
                 "ckpt-splices": gen_splices, "ckpt-truncations": gen_truncations}


# ----------------------------------------------------------------------------------------------
# The fuzz tests: checkpoints and weights


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("family", list(BYTE_FAMILIES))
def test_checkpoint_and_weights_bytes(family, scale, base, fake_data, tmp_path):
    outcomes, cases = Outcomes(family), case_range(family, scale)
    readers = Readers(outcomes, backbones=1 if scale == 0 else 4)
    path = str(tmp_path / "case.pth")
    for i in cases:
        with open(path, "wb") as f:
            f.write(BYTE_FAMILIES[family](case_rng(family, i), base))
        readers(i, path)
    outcomes.check(len(cases))


@pytest.mark.parametrize("scale", SCALES)
def test_checkpoint_fields(scale, base, fake_data, tmp_path):
    family = "ckpt-fields"
    outcomes, cases = Outcomes(family), case_range(family, scale)
    readers = Readers(outcomes, backbones=0)
    path = str(tmp_path / "case.pth")
    for i in cases:
        ckpt, done = mutate_fields(case_rng(family, i), base.ckpt)
        try:
            torch.save(ckpt, path)
        except (RecursionError, pickle.PicklingError, RuntimeError, TypeError):
            continue  # a value torch.save cannot write (a checkpoint cannot hold it either)
        outcomes.counts["mutations " + done[0].split()[0]] += 1
        n_before = len(outcomes.failures)
        readers(i, path)
        outcomes.failures[n_before:] = [f"{f}\nmutations: {done}" for f in outcomes.failures[n_before:]]
    outcomes.check(len(cases))


def tensors(rng):
    return rng.choice([torch.zeros(64, 3, 7, 7), torch.zeros(3), torch.zeros(2, device="meta"),
                       torch.zeros(3).to_sparse(), torch.zeros(2, dtype=torch.complex64), torch.tensor(1.0),
                       torch.zeros(1000, 2048, dtype=torch.half)])


def gen_weights_object(rng):
    """Random ResNet-50 weights files: flat state_dicts or {state_dict, meta}, with keys, values and
    metas of any kind."""
    keys = ["conv1.weight", "fc.bias", "bn1.running_mean", "layer1.0.conv1.weight", "module.conv1.weight",
            "", 1, ("a",)]
    sd = {rng.choice(keys): tensors(rng) if rng.random() < 0.7 else junk(rng) for _ in range(rng.randint(0, 4))}
    shape = rng.choice(["flat", "wrapped", "wrapped", "junk"])
    if shape == "flat":
        return sd
    if shape == "junk":
        return plain_object(rng)
    meta = rng.choice([None, {}, {"stride_in_1x1": junk(rng)}, {"stride_in_1x1": rng.choice([True, False, 0, 1])},
                       junk(rng)])
    return {"state_dict": sd, "meta": meta} if rng.random() < 0.8 else {"state_dict": sd}


@pytest.mark.parametrize("scale", SCALES)
def test_weights_objects(scale, tmp_path):
    family = "weights-objects"
    outcomes, cases = Outcomes(family), case_range(family, scale)
    readers = Readers(outcomes, backbones=2 if scale == 0 else 10)
    path = str(tmp_path / "weights.pth")
    for i in cases:
        try:
            torch.save(gen_weights_object(case_rng(family, i)), path)
        except (RecursionError, pickle.PicklingError, RuntimeError, TypeError):
            continue
        readers.weights(i, path)
    outcomes.check(len(cases))


def test_the_real_checkpoint_and_weights_load(base, fake_data, weights_path):
    """The checks refuse no real file: the run's checkpoint evaluates and resumes, an older one
    (without an option train.py added since) too, and the real ResNet-50 weights build."""
    evaluate_like(base.path)
    resume_like_train(base.path)
    older = copy_structure(base.ckpt)
    del older["args"]["cache_dir"], older["args"]["no_probe"]
    torch.save(older, base.path + ".older")
    resume_like_train(base.path + ".older")
    state, stride_in_1x1 = models.load_resnet50_state(weights_path)
    assert stride_in_1x1 is True and len(state) > 300


def mutated(base, path, change):
    ckpt = copy_structure(base.ckpt)
    change(ckpt)
    torch.save(ckpt, path)
    return path


def fc_of_other_shape(ckpt):
    sd = ckpt["state_dict"]
    key = [k for k in sd if k.endswith("weight")][-1]
    sd[key] = sd[key][:3]


# the named cases of the issue: (change, words of the one line, does evaluate.py refuse it too)
NAMED = {
    "image_size a string": (lambda c: c.update(image_size="32"), ["image_size"], True),
    "image_size huge": (lambda c: c.update(image_size=10**9), ["image_size"], True),
    "state_dict of other shapes": (fc_of_other_shape, ["does not fit", "other shapes"], True),
    "state_dict with a number key": (lambda c: c["state_dict"].update({5: torch.zeros(1)}), ["state_dict"], True),
    "three class names": (lambda c: c.update(classes=["a", "b", "c"]), ["classes"], True),
    "unknown model name": (lambda c: c["model"].update(name="resnet50"), ["'resnet50'", "none of"], True),
    "model name a list": (lambda c: c["model"].update(name=["resnet"]), ["model"], True),
    "num_classes 3": (lambda c: c["model"].update(num_classes=3), ["classes"], True),
    "stride_in_1x1 a string": (lambda c: c["model"].update(stride_in_1x1="yes"), ["stride_in_1x1"], True),
    "epoch a list": (lambda c: c.update(epoch=[1]), ["epoch"], True),
    "step negative": (lambda c: c.update(step=-1), ["step"], True),
    "run_name a list": (lambda c: c.update(run_name=["f"]), ["run_name"], True),
    "args missing lr": (lambda c: c["args"].pop("lr"), ["args", "lr"], True),
    "args missing val_split": (lambda c: c["args"].pop("val_split"), ["args", "val_split"], True),
    "args lr a string": (lambda c: c["args"].update(lr="0.1"), ["--lr", "'0.1'"], False),  # only --resume uses it
    "args epochs 0": (lambda c: c["args"].update(epochs=0), ["--epochs"], False),  # only --resume uses it
    "args test_subset 0": (lambda c: c["args"].update(test_subset=0), ["--test-subset 0"], True),
    "args seed negative": (lambda c: c["args"].update(seed=-1), ["--seed"], True),
    "args data_path unknown": (lambda c: c["args"].update(data_path="gpu"), ["--data-path"], False),  # only --resume uses it
    "args of another model": (lambda c: c["args"].update(model="resnet"), ["--model"], True),
    "args not a dict": (lambda c: c.update(args=["--lr", "1"]), ["args"], True),
    "meter junk": (lambda c: c.update(meter={"loss": "x"}), ["meter"], True),
    "rng_state short": (lambda c: c.update(rng_state=torch.zeros(10, dtype=torch.uint8)), ["rng_state"], True),
    "optimizer without groups": (lambda c: c["optimizer"].update(param_groups=[]), ["optimizer", "restore"], False),
    "optimizer lr a string": (lambda c: c["optimizer"]["param_groups"][0].update(lr="x"), ["optimizer"], False),
    "momentum of another shape": (lambda c: c["optimizer"]["state"].update(
        {0: {"momentum_buffer": torch.zeros(3)}}), ["optimizer", "restore"], False),
    "scheduler empty": (lambda c: c.update(scheduler={}), ["scheduler"], False),
    "scheduler last_epoch a string": (lambda c: c["scheduler"].update(last_epoch="2"), ["scheduler"], False),
}


@pytest.mark.parametrize("case", list(NAMED))
def test_named_checkpoint_faults_are_one_line(case, base, fake_data, tmp_path):
    change, words, evaluate_refuses = NAMED[case]
    path = mutated(base, str(tmp_path / "c.pth"), change)
    with pytest.raises(UserError) as e:
        resume_like_train(path)
    line = str(e.value)
    assert len(line.splitlines()) == 1 and all(w in line for w in words), line
    if evaluate_refuses:
        with pytest.raises(UserError):
            evaluate_like(path)
    else:
        evaluate_like(path)  # evaluation needs no optimizer: it still works


# ----------------------------------------------------------------------------------------------
# Images


MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F", "LAB", "HSV"]
FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "TGA", "ICO", "PCX", "SGI", "QOI"]


def random_image(rng, width, height):
    mode = rng.choice(MODES)
    np_rng = np.random.default_rng(rng.randrange(2**32))
    if mode in ("1",):
        return Image.fromarray(np_rng.integers(0, 2, (height, width)).astype(bool))
    if mode in ("I;16",):
        return Image.fromarray(np_rng.integers(0, 65536, (height, width)).astype(np.uint16))
    if mode == "I":
        return Image.fromarray(np_rng.integers(-2**31, 2**31, (height, width)).astype(np.int32))
    if mode == "F":
        return Image.fromarray(np_rng.standard_normal((height, width)).astype(np.float32) * 1e3)
    bands = len(Image.new(mode, (1, 1)).getbands())
    pixels = np_rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
    if mode in ("P", "PA"):
        img = Image.fromarray(pixels[..., 0], "L").convert(mode)
        img.putpalette(list(np_rng.integers(0, 256, 768, dtype=np.uint8)))
        return img
    return Image.frombytes(mode, (width, height), pixels.tobytes())


def encode(rng, img):
    """The image in a random format that writes its mode (PNG when none of the tried ones does)."""
    for fmt in rng.sample(FORMATS, 3) + ["PNG", "TIFF"]:
        buf = io.BytesIO()
        try:
            img.save(buf, fmt)
            return buf.getvalue()
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def pil_reads(blob):
    """Whether PIL itself reads the file (no load_image checks): those must classify."""
    try:
        with Image.open(io.BytesIO(blob)) as img:
            img.convert("RGB")
        return True
    except Exception:
        return False


def png(width, height, mode_byte=2, body=b""):
    """A PNG header claiming ``width`` x ``height`` (what a decompression bomb looks like before
    its pixels are read), with a tiny or empty image body."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, mode_byte, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(body)) + chunk(b"IEND", b"")


def gen_image(rng):
    """-> (bytes, expectation): 'ok' for images PIL reads (and not too elongated), 'error' for
    bombs and strips, None (either) for damaged or random files."""
    kind = rng.choices(["valid", "strip", "damaged", "random", "bomb"], [5, 1, 4, 1, 1])[0]
    if kind == "bomb":
        limit = Image.MAX_IMAGE_PIXELS
        side = rng.choice([int(math.sqrt(limit)) + 10, int(math.sqrt(2 * limit)) + 10, 60000])
        other = max(side, rng.randint(limit // side + 1, 2**20))
        if rng.random() < 0.5:  # a real bomb would hold its (compressed) pixels: a few bytes do here
            return png(side, other), "error"
        header = struct.pack("<2sIHHIIiiHHIIiiII", b"BM", 0, 0, 0, 54, 40, side, other, 1, 24, 0, 0, 0, 0, 0, 0)
        return header + b"\0" * 64, "error"
    if kind == "random":
        prefix = rng.choice([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\x00",
                             b"RIFF\0\0\0\0WEBP"])
        return prefix + random_bytes(rng), None
    size = rng.choice([1, 1, 2, 3, 7, 16, 32, 48])
    width, height = size, max(1, min(size * 16, int(size * rng.choice([1, 1, 0.5, 2, 3, 16, 1 / 16]))))
    if kind == "strip":
        width, height = rng.choice([(1, 17), (40, 2), (200, 3)])
    if rng.random() < 0.5:
        width, height = height, width
    blob = encode(rng, random_image(rng, width, height))
    if blob is None:
        return png(1, 1), None
    if kind == "valid":
        return blob, ("ok" if pil_reads(blob) else None)
    if kind == "strip":
        return blob, ("error" if pil_reads(blob) else None)
    out = bytearray(blob)
    damage = rng.choice(["flip", "truncate", "splice"])
    if damage == "flip":
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(out))
            out[i] = rng.randrange(256)
    elif damage == "truncate":
        del out[rng.randrange(len(out)):]
    else:
        i = rng.randrange(len(out))
        out[i:i] = rng.randbytes(rng.randint(1, 32))
    return bytes(out), None


@pytest.mark.parametrize("scale", SCALES)
def test_images(scale, base, tmp_path, capsys):
    """evaluate.py --images: every image PIL can read classifies (1x1, 16-bit, palette, RGBA,
    grayscale, CMYK, float, ... in a dozen formats); anything else is one line."""
    family = "images"
    outcomes, cases = Outcomes(family), case_range(family, scale)
    rt = setup_runtime("cpu", distributed=False)
    path = str(tmp_path / "image")
    for i in cases:
        blob, expect = gen_image(case_rng(family, i))
        with open(path, "wb") as f:
            f.write(blob)
        outcomes.run(i, "predict", lambda: evaluate.predict(base.model, [path], base.info, rt), expect)
        capsys.readouterr()  # predict prints a line per image
    outcomes.check(len(cases))


def test_a_real_decompression_bomb_is_one_line(tmp_path):
    """A 10,000 x 10,000 bilevel PNG (tiny on disk): PIL only warns (it is under twice its limit);
    load_image refuses it all the same, before reading its pixels."""
    path = str(tmp_path / "bomb.png")
    Image.new("1", (10000, 10000)).save(path)
    assert os.path.getsize(path) < 100_000
    with pytest.raises(UserError, match="more pixels than PIL reads safely"):
        evaluate.load_image(path)


# ----------------------------------------------------------------------------------------------
# CIFAR-10 folders


BIN_NAMES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
PY_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


def make_entry(rng, path, kind, real):
    if kind == "real":
        os.symlink(real, path)
    elif kind == "folder":
        os.mkdir(path)
    elif kind == "empty":
        open(path, "wb").close()
    elif kind == "random":
        with open(path, "wb") as f:
            f.write(random_bytes(rng))
    elif kind == "records":  # a whole number of records: passes the size check
        with open(path, "wb") as f:
            f.write(rng.randbytes(data.BIN_RECORD * rng.randint(1, 3)))
    elif kind == "prefix":  # the real file cut short (sometimes at a record boundary)
        with open(real, "rb") as src, open(path, "wb") as f:
            f.write(src.read(rng.choice([data.BIN_RECORD * rng.randint(1, 20), rng.randint(1, 100_000)])))
    elif kind == "right size":  # the official size, other bytes (a sparse file: fast to make)
        with open(path, "wb") as f:
            f.truncate(os.path.getsize(real))
            for _ in range(3):
                f.seek(rng.randrange(os.path.getsize(real)))
                f.write(rng.randbytes(8))
    elif kind == "dangling link":
        os.symlink(path + ".nowhere", path)
    elif kind == "link to a folder":
        os.symlink(os.path.dirname(path), path)
    # "missing": nothing


def gen_cifar_folder(rng, root, cifar_root):
    """A folder as --data-dir: the binary version with each file real or broken in some way, or a
    broken python version, or the wrong kind of thing where a folder should be."""
    layout = rng.choices(["bin", "bin itself", "py", "file"], [6, 1, 2, 1])[0]
    if layout == "file":  # --data-dir, or the batches folder in it, is a file
        target = root if rng.random() < 0.5 else os.path.join(root, "cifar-10-batches-bin")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(random_bytes(rng, 10))
        return target if target == root else root
    if layout == "py":
        folder = os.path.join(root, "cifar-10-batches-py")
        os.makedirs(folder)
        for name in PY_NAMES:
            kind = rng.choice(["missing", "folder", "empty", "random", "dangling link"])
            make_entry(rng, os.path.join(folder, name), kind, None)
        return root
    folder = os.path.join(root, "cifar-10-batches-bin")
    os.makedirs(folder)
    kinds = ["real", "missing", "folder", "empty", "random", "records", "prefix", "right size",
             "dangling link", "link to a folder"]
    choice = [rng.choices(kinds, [8, 2, 1, 1, 1, 2, 1, 1, 1, 1])[0] for _ in BIN_NAMES]
    if all(k == "real" for k in choice):  # the real data set: loads, but costs half a second
        choice[rng.randrange(6)] = rng.choice(kinds[1:])
    for name, kind in zip(BIN_NAMES, choice):
        make_entry(rng, os.path.join(folder, name), kind, os.path.join(cifar_root, "cifar-10-batches-bin", name))
    return folder if layout == "bin itself" else root


@pytest.mark.parametrize("scale", SCALES)
def test_cifar_folders(scale, cifar_root, tmp_path, monkeypatch):
    family = "cifar-folders"
    outcomes, cases = Outcomes(family), case_range(family, scale)
    for i in cases:
        rng = case_rng(family, i)
        root = gen_cifar_folder(rng, str(tmp_path / f"c{i}"), cifar_root)
        if rng.random() < 0.3:
            monkeypatch.setenv(data.PARTIAL_ENV, "1")
        else:
            monkeypatch.delenv(data.PARTIAL_ENV, raising=False)
        outcomes.run(i, "load_cifar10", lambda: data.load_cifar10(root, download=False))
        folder = os.path.join(root, "cifar-10-batches-bin")
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):  # without the md5: labels over 9 are refused
                labels = np.fromfile(path, np.uint8)[::data.BIN_RECORD]
                expect = "error" if os.path.getsize(path) % data.BIN_RECORD == 0 and labels.max(initial=0) > 9 else None
                outcomes.run(i, "read_bin_file", lambda: data.read_bin_file(path, check_md5=False), expect)
    outcomes.check(len(cases))


# ----------------------------------------------------------------------------------------------
# End to end: the real command lines


def assert_one_line(res):
    assert res.returncode != 0, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory, base):
    d = tmp_path_factory.mktemp("fuzz_bad")
    f = type("BadFiles", (), {"dir": d})()
    f.hi = d / "hi.pth"
    f.hi.write_bytes(b"hi\n")
    f.bomb = d / "bomb.png"
    f.bomb.write_bytes(png(30000, 30000))
    f.epoch_list = mutated(base, str(d / "epoch_list.pth"), lambda c: c.update(epoch=[1]))
    return f


def test_e2e_garbage_checkpoint_and_weights(bad_files, cifar_root):
    line = assert_one_line(run_script("evaluate.py", bad_files.hi, "--data-dir", cifar_root, env=ENV))
    assert line.startswith("evaluate.py: error: checkpoint") and "not a PyTorch file" in line
    res = run_script("train.py", "--model", "resnet", "--weights", bad_files.hi, "--image-size", "32",
                     "--epochs", "1", "--train-subset", "32", "--batch-size", "16", "--val-split", "100",
                     "--no-download", "--data-dir", cifar_root, "--device", "cpu", "--out", bad_files.dir / "ck",
                     "--log-dir", bad_files.dir / "log", env=ENV)
    assert "weights file" in assert_one_line(res)


def test_e2e_bomb_image_and_mutated_resume(bad_files, base, cifar_root):
    line = assert_one_line(run_script("evaluate.py", base.path, "--images", bad_files.bomb, env=ENV))
    assert "more pixels than PIL reads safely" in line
    line = assert_one_line(run_script("train.py", "--resume", bad_files.epoch_list, "--data-dir", cifar_root,
                                      "--device", "cpu", env=ENV))
    assert "epoch" in line


@pytest.mark.slow
def test_e2e_images_of_every_kind_classify(base, tmp_path):
    paths = []
    for name, img in {"gray": Image.new("L", (5, 9), 80), "palette": Image.new("P", (3, 3), 7),
                      "rgba": Image.new("RGBA", (8, 8), (1, 2, 3, 4)), "one": Image.new("RGB", (1, 1)),
                      "sixteen": Image.fromarray(np.full((4, 6), 40000, np.uint16))}.items():
        paths.append(str(tmp_path / f"{name}.png"))
        img.save(paths[-1])
    res = run_script("evaluate.py", base.path, "--images", *paths, env=ENV)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert [ln.split(":")[0] for ln in res.stdout.splitlines()] == paths

