"""Exact mid-epoch resume on both data paths (issue 14).

* PIL path: every augmentation draw is a function of (seed, epoch, image index), so the batches
  from step k on are the same whether the epoch started at step 0 or was resumed at step k, and
  whatever the number of workers; len() is the whole epoch's, as train.py counts steps.
* tensor path: the order and crops are drawn on the CPU whatever the training device, so a run
  resumed on another device sees the same images.
* end to end: train.py --data-path pil --workers 2, interrupted by SIGINT mid-epoch and resumed,
  ends with the uninterrupted run's weights, bit for bit.
"""
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, child_env, run_script
import data

N, BATCH, SIZE = 50, 8, 32  # 6 training batches an epoch (the last partial one is dropped)


def _images(n=N, seed=11):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _pil(workers=0, batch=BATCH, train=True, seed=3, augment=True):
    ids = np.arange(N, dtype=np.int64)  # labels double as image ids
    return data.PILLoader(_images(), ids, batch, SIZE, train, workers, seed=seed, augment=augment)


def _batches(loader, epoch, start_step=0):
    loader.set_epoch(epoch, start_step)
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


# ----------------------------------------------------------------------------------------------
# PIL path


@pytest.fixture(scope="module")
def full_epoch():
    """Epoch 1 of the PIL loader without workers, from step 0."""
    return _batches(_pil(), 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_pil_loader_resumed_mid_epoch_gives_the_same_batches(full_epoch, workers):
    loader = _pil(workers)
    assert len(full_epoch) == N // BATCH
    if workers:  # the workers draw exactly what the main process draws
        assert _same(_batches(loader, 1), full_epoch)
    for k in (1, 4):
        resumed = _batches(loader, 1, start_step=k)
        assert len(resumed) == len(full_epoch) - k
        assert _same(resumed, full_epoch[k:]), f"resumed at step {k} with {workers} workers"
    assert _same(_batches(loader, 1), full_epoch)  # after a resumed pass, a whole epoch again


def test_pil_loader_draws_are_per_image_and_random(full_epoch):
    by_id = lambda batches: {int(i): img for x, y in batches for img, i in zip(x, y)}
    epoch1 = by_id(full_epoch)
    # the same image in the same epoch gets the same draws, however the batches are cut
    other_batching = by_id(_batches(_pil(batch=5), 1))
    common = set(epoch1) & set(other_batching)
    assert len(common) > 30
    assert all(torch.equal(epoch1[i], other_batching[i]) for i in common)
    # ... and other draws in another epoch, and from another seed
    for other in (by_id(_batches(_pil(), 2)), by_id(_batches(_pil(seed=4), 1))):
        common = set(epoch1) & set(other)
        assert sum(torch.equal(epoch1[i], other[i]) for i in common) < len(common) / 2
    # it is augmented: not the plain evaluation transform
    plain = data.eval_transform(SIZE)
    images = _images()
    assert sum(torch.equal(img, plain(Image.fromarray(images[i]))) for i, img in epoch1.items()) < len(epoch1) / 2


def test_pil_loader_leaves_the_global_rng_alone():
    """train.py saves torch's RNG in its checkpoints: the loader must neither read nor advance it."""
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = _batches(_pil(), 1)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(456)
    assert _same(_batches(_pil(), 1), a)


@pytest.mark.parametrize("augment", [True, False])
def test_pil_loader_without_augmentation_is_the_eval_transform(augment):
    plain, images = data.eval_transform(SIZE), _images()
    eval_loader = _batches(_pil(train=False, augment=augment), 1)
    assert torch.equal(torch.cat([y for _, y in eval_loader]), torch.arange(N))
    expected = torch.stack([plain(Image.fromarray(im)) for im in images])
    assert torch.equal(torch.cat([x for x, _ in eval_loader]), expected)
    if not augment:  # training without augmentation: shuffled, not augmented
        for x, y in _batches(_pil(train=True, augment=False), 1):
            assert torch.equal(x, expected[y])


@pytest.mark.parametrize("train", [True, False])
def test_pil_loader_len_is_the_whole_epoch_after_a_resume(train):
    loader = _pil(train=train)
    loader.set_epoch(1, 0)
    whole = len(loader)
    assert whole == data.num_batches(N, BATCH, train)
    loader.set_epoch(1, 4)
    assert len(loader) == whole  # train.py: steps first_step+1 .. len(loader)
    assert len([y for _, y in loader]) == whole - 4


# ----------------------------------------------------------------------------------------------
# tensor path


def test_tensor_loader_draws_on_the_cpu_whatever_the_device(monkeypatch):
    """The order and crops come from a CPU generator, moved to the device: 'meta' stands for an
    accelerator (a device generator cannot be made for it) on a CPU-only machine."""
    images, ids = _images(), np.arange(N, dtype=np.int64)
    real_randperm, real_draw_crops = torch.randperm, data.draw_crops
    seen = []  # (what, generator device, values)

    def randperm(*args, generator=None, **kw):
        out = real_randperm(*args, generator=generator, **kw)
        seen.append(("order", generator.device.type, out))
        return out

    def draw_crops(n, size, generator, device):
        out = real_draw_crops(n, size, generator, device)
        seen.append(("crops", generator.device.type, out))
        return out

    monkeypatch.setattr(torch, "randperm", randperm)
    monkeypatch.setattr(data, "draw_crops", draw_crops)
    draws = {}
    for device in ("cpu", "meta"):
        seen.clear()
        loader = data.TensorLoader(images, ids, BATCH, SIZE, True, device, seed=2)
        loader.set_epoch(3)
        x, y = next(iter(loader))
        assert x.device.type == y.device.type == device and x.shape == (BATCH, 3, SIZE, SIZE)
        assert [(what, gen) for what, gen, _ in seen] == [("order", "cpu"), ("crops", "cpu")], device
        assert all(t.device.type == "cpu" for _, _, out in seen for t in (out if isinstance(out, tuple) else (out,)))
        draws[device] = [out for _, _, out in seen]
    order, crops = draws["cpu"]
    meta_order, meta_crops = draws["meta"]
    assert torch.equal(order, meta_order)
    assert all(torch.equal(a, b) for a, b in zip(crops, meta_crops))


# ----------------------------------------------------------------------------------------------
# end to end: train.py on the PIL path with 2 workers, SIGINT mid-epoch, resume

PIL_RUN = ["--model", "sample_resnet", "--data-path", "pil", "--workers", "2", "--image-size", "32",
           "--epochs", "2", "--batch-size", "32", "--val-split", "100", "--test-subset", "100", "--val-every", "1",
           "--no-download"]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def _progress(text):
    """(epoch, step, total) of every progress line."""
    return [tuple(map(int, m)) for m in re.findall(r"^  epoch (\d+)/\d+ step (\d+)/(\d+) ", text, re.M)]


def _interrupt_and_resume(tmp, cifar_root, args, steps):
    common = ["--out", str(tmp / "ck"), "--log-dir", str(tmp / "log"), *args]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *common, "--run-name", "cut"],
                            cwd=tmp, env=child_env({"CIFAR10_ROOT": cifar_root}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("  epoch 1/2 step"):
                proc.send_signal(signal.SIGINT)  # train.py stops after the step in which it arrived
                break
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(seen) + out
    assert proc.returncode == 130, (out[-2000:], err[-2000:])
    command = re.findall(r"Resume with: python train\.py --resume (\S+)", out)
    assert len(command) == 1, out[-2000:]
    cut = _load(command[0])
    assert cut["epoch"] == 0 and 0 < cut["step"] < steps, (cut["epoch"], cut["step"])
    resumed = _ok(run_script("train.py", "--resume", command[0], cwd=tmp, env={"CIFAR10_ROOT": cifar_root}))
    full = _ok(run_script("train.py", *common, "--run-name", "full", cwd=tmp, env={"CIFAR10_ROOT": cifar_root}))
    _check_resumed(tmp, cut, resumed.stdout, full.stdout, steps)


def _check_resumed(tmp, cut, resumed_out, full_out, steps):
    """The resumed epoch counts on from the step it was cut at, up to the epoch's own total, and
    the run ends with the uninterrupted run's weights and test accuracy."""
    a, b = _load(tmp / "ck" / "cut" / "last.pth"), _load(tmp / "ck" / "full" / "last.pth")
    assert a["epoch"] == b["epoch"] == 2
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differ = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differ, f"mid-epoch resume vs uninterrupted: {len(differ)} tensors differ, e.g. {differ[:5]}"
    test_acc = lambda text: re.findall(r"^Test Acc : (\S+)$", text, re.M)
    assert test_acc(resumed_out) == test_acc(full_out) and test_acc(full_out)
    progress = _progress(resumed_out)
    assert progress and all(total == steps and 0 < step <= total for _, step, total in progress), progress
    # issue 33: it starts at the step after the cut (a silent restart from step 0 ends the same)
    assert progress[0] == (1, cut["step"] + 1, steps), progress
    assert (1, cut["step"] + 1, steps) in progress and (1, steps, steps) in progress, progress


@pytest.mark.slow
def test_pil_sigint_mid_epoch_then_resume_is_bit_identical(tmp_path, cifar_root):
    """As a user runs it: three train.py processes, a real SIGINT after the first progress line."""
    _interrupt_and_resume(tmp_path, cifar_root, [*PIL_RUN, "--train-subset", "256"], steps=8)


# the fast variant: one process (torch is imported once) runs train.py's main three times; the
# SIGINT is sent by the process to itself after step 1, so the cut is at step 2
DRIVER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import report, train
common = sys.argv[1:]
show = report.EpochProgress.show
def show_then_interrupt(self, step, *args):
    show(self, step, *args)
    report.EpochProgress.show = show
    os.kill(os.getpid(), signal.SIGINT)
report.EpochProgress.show = show_then_interrupt
print("=== cut", flush=True)
assert train.main([*common, "--run-name", "cut"]) == 130
print("=== resumed", flush=True)
assert train.main(["--resume", os.path.join(common[common.index("--out") + 1], "cut", "last.pth")]) == 0
print("=== full", flush=True)
assert train.main([*common, "--run-name", "full"]) == 0
"""


def test_pil_mid_epoch_resume_is_bit_identical_fast(tmp_path, cifar_root):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=ROOT))
    proc = _ok(run_script(driver, "--out", tmp_path / "ck", "--log-dir", tmp_path / "log", *PIL_RUN,
                          "--train-subset", "128", cwd=tmp_path, env={"CIFAR10_ROOT": cifar_root}))
    _, cut_out, resumed_out, full_out = re.split(r"^=== \w+$", proc.stdout, flags=re.M)
    assert re.search(r"stopped by SIGINT at epoch 1, step 2;", cut_out), cut_out[-2000:]
    assert "Test Acc" not in cut_out
    _check_resumed(tmp_path, {"step": 2}, resumed_out, full_out, steps=4)
