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
# Also waits on a GPU, and never needed by a training step (its batches arrive on the device):
# data-dependent shapes (nonzero, boolean masks), and copies to the CPU (Tensor.to).
STEP_SYNCING = SYNCING + ["nonzero", "argwhere", "masked_select", "to", "__getitem__"]
SYNCING_FUNCTIONS = ["nonzero", "argwhere", "masked_select"]  # torch.<name>(tensor) as well
OPTIMIZERS = ["sgd", "adamw"]  # sample_resnet's and the frozen models' (engine.MODEL_DEFAULTS)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU version runs everywhere)")


def reads_the_host(name, args, kwargs):
    """Whether a call of Tensor.<name> with these arguments would wait for the device: a copy to
    the CPU (``.to("cpu")``, ``.to(cpu_tensor)``), or indexing with a boolean mask (its size is
    data-dependent: the host must learn how many are true)."""
    if name == "to":
        targets = list(args) + list(kwargs.values())
        return any((isinstance(t, (str, torch.device)) and torch.device(t).type == "cpu")
                   or (isinstance(t, torch.Tensor) and t.device.type == "cpu") for t in targets)
    if name == "__getitem__":
        index = args[0] if isinstance(args[0], tuple) else (args[0],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    return True


@contextlib.contextmanager
def count_host_syncs(monkeypatch, names=SYNCING):
    calls = []
    for owner, name in [(torch.Tensor, n) for n in names] + [(torch, n) for n in SYNCING_FUNCTIONS if n in names]:
        real = getattr(owner, name)

        def spy(*a, _real=real, _name=name, **k):
            if reads_the_host(_name, a[1:], k):
                calls.append(_name)
            return _real(*a, **k)
        monkeypatch.setattr(owner, name, spy)
    yield calls
    monkeypatch.undo()


def test_the_spy_sees_every_kind_of_host_read(monkeypatch):
    """Issue 33: what the step must never do, each seen by count_host_syncs."""
    x = torch.arange(6.0)
    reads = [lambda: x.sum().item(), lambda: x.tolist(), lambda: x.to("cpu"), lambda: x.to(torch.device("cpu")),
             lambda: x.to(x), lambda: x[x > 2], lambda: x.nonzero(), lambda: torch.nonzero(x), lambda: x.numpy(),
             lambda: bool(x.any()), lambda: x.argwhere()]
    for read in reads:
        with count_host_syncs(monkeypatch, STEP_SYNCING) as calls:
            read()
        assert calls, read
    with count_host_syncs(monkeypatch, STEP_SYNCING) as calls:  # and what is device work only
        _ = x[1:3], x[torch.tensor([0, 2])], x.to(torch.float16), x.to(dtype=torch.float64), x * 2
    assert calls == []


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
    with count_host_syncs(monkeypatch, STEP_SYNCING) as calls:
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


def test_warmup_is_at_most_a_tenth_of_a_short_run():
    """Issue 33: 2 epochs of 10 steps: one warmup epoch would be half the run; the cap makes it
    2 steps (a tenth), so the peak comes at the second step and the decay starts there."""
    opt = engine.make_optimizer("sgd", 0.1, 0.0, [nn.Parameter(torch.zeros(1))])
    sched = engine.make_scheduler(opt, 10, 2)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.05) and lrs[1] == lrs[2] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))


def test_each_model_trains_with_its_own_defaults():
    """Issue 33: engine.MODEL_DEFAULTS reach the optimiser train.py builds: SGD with Nesterov
    momentum 0.9 for sample_resnet and the fine-tuned models, AdamW for the frozen heads, each with
    its learning rate and weight decay; a value given on the command line wins."""
    import train
    expected = {  # docs/training.md, "Training defaults"
        "sample_resnet": (torch.optim.SGD, 0.1, 5e-4),
        "resnet": (torch.optim.AdamW, 1e-3, 1e-4),
        "resnet_att": (torch.optim.AdamW, 1e-3, 5e-2),
        "resnet_scratch": (torch.optim.SGD, 0.01, 5e-4),
        "resnet_att_scratch": (torch.optim.SGD, 0.01, 5e-4),
    }
    param = nn.Parameter(torch.zeros(1))
    model = nn.Module()
    model.p = param
    for name, (kind, lr, wd) in expected.items():
        args, _ = train.parse_args(["--model", name])
        opt, _, criterion, _ = engine.make_optimisation(args, model, 10, None)
        group = opt.param_groups[0]
        assert type(opt) is kind and group["initial_lr"] == lr and group["weight_decay"] == wd, name
        if kind is torch.optim.SGD:
            assert group["nesterov"] is True and group["momentum"] == 0.9, name
        assert criterion.label_smoothing == 0.0
    args, _ = train.parse_args(["--model", "resnet", "--lr", "0.5", "--optimizer", "sgd", "--weight-decay", "0",
                                "--label-smoothing", "0.1"])
    opt, _, criterion, _ = engine.make_optimisation(args, model, 10, None)
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["initial_lr"] == 0.5
    assert opt.param_groups[0]["weight_decay"] == 0 and criterion.label_smoothing == 0.1
    # the smoothing reaches the loss: a confident right answer costs more with it
    logits, y = torch.tensor([[8.0, 0.0, 0.0]]), torch.tensor([0])
    assert criterion(logits, y) > nn.CrossEntropyLoss()(logits, y) + 0.05
