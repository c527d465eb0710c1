"""engine.py: the training step and evaluation never wait for the device (issue 11), the schedule.

On the CPU there is no asynchronous device to wait for, so the test counts the calls that would
synchronise a GPU (``.item()``, ``.tolist()``, ``bool(tensor)``, ``float(tensor)``, ``.cpu()``,
``.numpy()``): none in a training step, and a fixed number per evaluation, whatever its number of
batches. Where CUDA exists, torch.cuda.set_sync_debug_mode("error") checks the same on the GPU.
"""
import contextlib

import numpy as np
import pytest
import torch
import torch.nn as nn

import data
import engine
from models import build_model

SYNCING = ["item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"]


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


def setup(device="cpu", n=64, batch=16):
    torch.manual_seed(0)
    model, _ = build_model("sample_resnet")
    model.to(device)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)
    loader = data.TensorLoader(x, y, batch, 32, True, device)
    optimizer = engine.make_optimizer("sgd", 0.01, 5e-4, model.parameters())
    scheduler = engine.make_scheduler(optimizer, len(loader), 1)
    return model, loader, optimizer, scheduler


def test_the_training_step_never_reads_the_device(monkeypatch):
    model, loader, optimizer, scheduler = setup()
    meter = engine.Meter(torch.device("cpu"))
    batches = list(loader)
    with count_host_syncs(monkeypatch) as calls:
        for x, y in batches:
            engine.train_step(model, x, y, nn.CrossEntropyLoss(), optimizer, scheduler,
                              contextlib.nullcontext(), meter)
    assert calls == []
    loss, acc, count = meter.read()  # the sums are right when finally read
    assert count == 64 and 0 <= acc <= 1 and np.isfinite(loss)


def test_evaluation_reads_the_device_a_fixed_number_of_times(monkeypatch):
    model, _, _, _ = setup()
    rng = np.random.default_rng(1)
    counts = {}
    for n in (8, 40):  # 1 batch and 5 batches
        x, y = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)
        loader = data.TensorLoader(x, y, 8, 32, False, "cpu")
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU version above runs everywhere)")
def test_the_training_step_never_syncs_on_cuda():
    model, loader, optimizer, scheduler = setup("cuda")
    meter = engine.Meter(torch.device("cuda"))
    batches = list(loader)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in batches:
            engine.train_step(model, x, y, nn.CrossEntropyLoss(), optimizer, scheduler,
                              torch.autocast("cuda", dtype=torch.bfloat16), meter)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert meter.read()[2] == 64


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
