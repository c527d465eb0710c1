"""engine.py: the training step and evaluation never wait for the device (issue 11), the schedule.

On the CPU there is no asynchronous device to wait for, so the tests count the calls that would
synchronise a GPU (``.item()``, ``.tolist()``, ``bool(tensor)``, ``float(tensor)``, ``.cpu()``,
``.numpy()``): none in a training step, and a fixed number per evaluation, whatever its number of
batches. They run the step as train.py runs it on CUDA: channels_last model and batches, the fused
optimizer (SGD and AdamW). Where CUDA exists, torch.cuda.set_sync_debug_mode checks the same on
the GPU, with cuDNN benchmark and bf16 autocast as well (the GPU check's "sync" check runs them).
"""
import contextlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import data
import engine
from models import build_model

SYNCING = ["item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"]
OPTIMIZERS = ["sgd", "adamw"]  # sample_resnet's and the frozen models' (engine.MODEL_DEFAULTS)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU version runs everywhere)")


@contextlib.contextmanager
def count_host_syncs(monkeypatch):
    calls = []
    for name in SYNCING:
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    yield calls
    monkeypatch.undo()


def setup(device="cpu", n=64, batch=16, optimizer="sgd"):
    """sample_resnet as train.py trains it on ``device``: channels_last, the fused optimizer."""
    torch.manual_seed(0)
    model, _ = build_model("sample_resnet")
    model.to(device, memory_format=torch.channels_last)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)
    loader = data.TensorLoader(x, y, batch, 32, True, device, channels_last=True)
    opt = engine.make_optimizer(optimizer, 0.01, 5e-4, model.parameters(), fused=True)
    scheduler = engine.make_scheduler(opt, len(loader), 1)
    return model, loader, opt, scheduler


def eval_loader(n, device="cpu", seed=1):
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)
    return data.TensorLoader(x, y, 8, 32, False, device, channels_last=True)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_the_training_step_never_reads_the_device(optimizer, monkeypatch):
    model, loader, opt, scheduler = setup(optimizer=optimizer)
    meter = engine.Meter(torch.device("cpu"))
    batches = [(x.clone(), y) for x, y in loader]  # the CPU loader reuses one buffer
    with count_host_syncs(monkeypatch) as calls:
        for x, y in batches:
            engine.train_step(model, x, y, nn.CrossEntropyLoss(), opt, scheduler, contextlib.nullcontext(), meter)
    assert calls == []
    loss, acc, count = meter.read()  # the sums are right when finally read
    assert count == 64 and 0 <= acc <= 1 and np.isfinite(loss)


def test_evaluation_reads_the_device_a_fixed_number_of_times(monkeypatch):
    model, _, _, _ = setup()
    counts = {}
    for n in (8, 40):  # 1 batch and 5 batches
        loader = eval_loader(n)
        with count_host_syncs(monkeypatch) as calls:
            engine.evaluate(model, loader, torch.device("cpu"), contextlib.nullcontext())
        counts[n] = len(calls)
    assert counts[8] == counts[40] <= 4, counts


def test_evaluation_matches_a_plain_loop():
    model, _, _, _ = setup()
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 50).astype(np.int64)
    loader = data.TensorLoader(x, y, 16, 32, False, "cpu")
    loss, acc, confusion = engine.evaluate(model, loader, torch.device("cpu"), contextlib.nullcontext())
    with torch.no_grad():
        logits = torch.cat([model(b) for b, _ in loader])
    labels = torch.as_tensor(y)
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    assert acc == (logits.argmax(1) == labels).sum().item() / 50
    assert confusion.sum() == 50 and confusion.trace() == (logits.argmax(1) == labels).sum()
    for t, p in zip(labels.tolist(), logits.argmax(1).tolist()):
        confusion[t, p] -= 1
    assert (confusion == 0).all()


# ----------------------------------------------------------------------------------------------
# The same on CUDA, as train.py runs there: cuDNN benchmark, bf16 autocast, fused optimizer


@contextlib.contextmanager
def cuda_sync_debug(mode):
    """torch.cuda.set_sync_debug_mode(mode) with cuDNN benchmark on (train.py's), both restored."""
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.backends.cudnn.benchmark = benchmark


@needs_cuda
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_the_training_step_never_syncs_on_cuda(optimizer):
    model, loader, opt, scheduler = setup("cuda", optimizer=optimizer)
    meter = engine.Meter(torch.device("cuda"))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    batches = list(loader)  # fresh tensors on CUDA
    step = lambda x, y: engine.train_step(model, x, y, nn.CrossEntropyLoss(), opt, scheduler, autocast, meter)
    with cuda_sync_debug("default"):  # the first step's one-time work (autotuning, optimizer state)
        step(*batches[0])
    with cuda_sync_debug("error"):
        for x, y in batches[1:]:
            step(x, y)
    assert meter.read()[2] == 64


@needs_cuda
def test_evaluation_syncs_a_fixed_number_of_times_on_cuda():
    model, _, _, _ = setup("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    counts = {}
    for n in (8, 8, 40):  # the first call autotunes; then 1 batch and 5 batches
        loader = eval_loader(n, "cuda")
        with cuda_sync_debug("warn"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.evaluate(model, loader, torch.device("cuda"), autocast)
        counts[n] = sum("synchronizing" in str(w.message) for w in caught)
    assert 1 <= counts[8] == counts[40] <= 4, counts  # at least the final read: the warnings are seen


def test_schedule_warms_up_then_decays_to_zero():
    opt = engine.make_optimizer("sgd", 0.1, 0.0, [nn.Parameter(torch.zeros(1))])
    sched = engine.make_scheduler(opt, 10, 10)  # 100 steps, 10 of warmup
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-4
