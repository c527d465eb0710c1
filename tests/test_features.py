"""The frozen models' feature cache (features.py): what it computes equals the backbone on the images,
it resumes an interrupted extraction, reuses entries, recomputes damaged chunks, refuses a full
disk, and training the head on it equals training on the images without augmentation."""
import logging
import os
import re
import shutil

import numpy as np
import pytest
import torch

import data
import features
from conftest import run_script
from models import build_model
from utils import UserError

LOG = logging.getLogger("test_features")
CPU = torch.device("cpu")


class StopAfter:
    """A StopSignals stand-in that asks to stop once ``calls`` batches were started."""

    def __init__(self, calls):
        self.calls, self.received = calls, []

    def exit_if_requested(self, what):
        self.calls -= 1
        if self.calls < 0:
            raise UserError(f"stopped by SIGINT {what}", exit_code=130)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(features, "CHUNK", 8)
    monkeypatch.setattr(features, "EXTRACT_BATCH", 4)


@pytest.fixture(scope="module")
def frozen():
    torch.manual_seed(0)
    model, _ = build_model("resnet_att", weights="none")
    return model.eval()


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def cached(model, x, y, kind, cache_dir, size=64, stop=None, log=LOG):
    return features.cached_features(model, "train", x, y, kind, str(cache_dir), size, CPU,
                                     torch.autocast("cpu", enabled=False), log, stop)


def test_cached_features_equal_the_backbone_on_the_images(frozen, tmp_path, small_chunks):
    x, y = images(20)
    maps, pooled = cached(frozen, x, y, "maps", tmp_path), cached(frozen, x, y, "pooled", tmp_path)
    batch = data.TensorLoader(x, y, 20, 64, train=False, device="cpu").batch(np.arange(20))
    with torch.inference_mode():
        fmap = frozen.features(batch)
    assert maps.shape == (20, 2048, 2, 2) and maps.dtype == np.float16 and pooled.dtype == np.float32
    # float16 storage: relative rounding 2^-11. Batches of 4 vs 20 take other float32 kernels: near
    # zero that is ~1e-4 absolute (measured 1.3e-4) on features of scale ~30
    scale = fmap.abs().max().item()
    np.testing.assert_allclose(maps.astype(np.float32), fmap.numpy(), rtol=2e-3, atol=1e-4 * scale)
    np.testing.assert_allclose(pooled, fmap.mean(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-5 * scale)


def test_interrupted_extraction_resumes_where_it_stopped(frozen, tmp_path, small_chunks, caplog):
    x, y = images(30)  # 4 chunks of 8 (the last of 6), 2 batches a chunk
    with pytest.raises(UserError, match="chunks are cached"):
        cached(frozen, x, y, "maps", tmp_path / "cut", stop=StopAfter(5))  # stops inside chunk 3
    (entry,) = os.listdir(tmp_path / "cut")
    with caplog.at_level(logging.INFO, logger=LOG.name):
        resumed = np.array(cached(frozen, x, y, "maps", tmp_path / "cut"))
    assert "(2 of 4 chunks to go)" in caplog.text  # chunks 0 and 1 were kept
    whole = cached(frozen, x, y, "maps", tmp_path / "whole")
    assert np.array_equal(resumed, whole)


def test_second_request_reads_the_cache_without_computing(frozen, tmp_path, small_chunks, caplog, monkeypatch):
    x, y = images(12)
    first = np.array(cached(frozen, x, y, "maps", tmp_path))
    monkeypatch.setattr(features, "extract", lambda *a, **k: pytest.fail("recomputed a complete entry"))
    with caplog.at_level(logging.INFO, logger=LOG.name):
        again = cached(frozen, x, y, "maps", tmp_path)
        pooled = cached(frozen, x, y, "pooled", tmp_path)  # written by the same pass: resnet reuses it
    assert np.array_equal(first, again) and pooled.shape == (12, 2048)
    assert "from the cache" in caplog.text


def test_the_key_changes_with_what_changes_the_features(frozen, tmp_path):
    x, y = images(8)
    _, key = features.cache_key(frozen, x, y, 64, torch.float32)
    other_x = x.copy()
    other_x[0, 0, 0, 0] ^= 1
    assert features.cache_key(frozen, other_x, y, 64, torch.float32)[1] != key  # one pixel
    assert features.cache_key(frozen, x, y, 96, torch.float32)[1] != key  # image size
    assert features.cache_key(frozen, x, y, 64, torch.bfloat16)[1] != key  # compute dtype
    torch.manual_seed(1)
    other, _ = build_model("resnet", weights="none")  # other backbone weights
    assert features.cache_key(other, x, y, 64, torch.float32)[1] != key
    same, _ = build_model("resnet", weights="none")
    same.backbone.load_state_dict(frozen.backbone.state_dict())  # same numbers, other model: same key
    assert features.cache_key(same.to(memory_format=torch.channels_last), x, y, 64, torch.float32)[1] == key


@pytest.mark.parametrize("kind", ["maps", "pooled"])
def test_a_damaged_chunk_is_recomputed_with_a_warning(kind, frozen, tmp_path, small_chunks, caplog):
    x, y = images(20)
    good = np.array(cached(frozen, x, y, kind, tmp_path))
    (entry,) = os.listdir(tmp_path)
    path = tmp_path / entry / f"{kind}.npy"
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF  # a byte of the last chunk
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.INFO, logger=LOG.name):
        again = np.array(cached(frozen, x, y, kind, tmp_path))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 damaged chunk" in warnings[0].getMessage()
    assert "(1 of 3 chunks to go)" in caplog.text
    assert np.array_equal(again, good)


@pytest.mark.parametrize("damage", ["meta", "progress", "truncate"])
def test_unreadable_bookkeeping_means_recompute_never_use(damage, frozen, tmp_path, small_chunks):
    x, y = images(12)
    good = np.array(cached(frozen, x, y, "maps", tmp_path))
    (entry,) = os.listdir(tmp_path)
    folder = tmp_path / entry
    if damage == "meta":
        (folder / "meta.json").write_bytes(os.urandom(50))
    elif damage == "progress":
        (folder / "progress.json").write_text('{"chunks": [1, 2')
    else:
        with open(folder / "maps.npy", "r+b") as f:
            f.truncate(1000)
    assert np.array_equal(np.array(cached(frozen, x, y, "maps", tmp_path)), good)


def test_a_full_disk_is_refused_before_writing(frozen, tmp_path, monkeypatch):
    x, y = images(8)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 10**5, 10**5))
    with pytest.raises(UserError) as e:
        cached(frozen, x, y, "maps", tmp_path)
    line = str(e.value)
    assert "\n" not in line and "GB more" in line and "--cache-dir" in line
    assert not any(n.endswith(".npy") for _, _, files in os.walk(tmp_path) for n in files)


def test_feature_loader_follows_the_image_loaders_order():
    x, y = images(50)
    feats = np.arange(50, dtype=np.float32)[:, None].repeat(3, 1)
    cache = features.FeatureLoader(feats, y, 16, True, seed=3, device=CPU)
    imgs = data.TensorLoader(x, y, 16, 32, True, "cpu", seed=3, augment=False)
    for epoch in (0, 4):
        cache.set_epoch(epoch, 1)
        imgs.set_epoch(epoch, 1)
        got = [(f[:, 0, 0, 0].long(), lab) for f, lab in cache]
        want = [lab for _, lab in imgs]
        assert len(got) == len(want) == 2  # 3 batches, dropped remainder, from step 1
        for (idx, lab), wlab in zip(got, want):
            assert torch.equal(lab, wlab) and torch.equal(torch.as_tensor(y)[idx], lab)


# ----------------------------------------------------------------------------------------------
# train.py end to end: the head on cached features equals the head on the images

HEAD = ["--weights", "none", "--no-augment", "--image-size", "64", "--epochs", "2", "--train-subset", "64",
        "--batch-size", "16", "--val-split", "10", "--test-subset", "20", "--val-every", "1", "--no-download"]


def head_run(tmp, model, name, *extra):
    proc = run_script("train.py", "--model", model, *HEAD, "--run-name", name, "--out", tmp / "ck", "--log-dir",
                      tmp / "log", "--cache-dir", tmp / "cache", *extra, cwd=tmp,
                      env={"CIFAR10_ROOT": os.environ.get("CIFAR10_ROOT", "")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_resnet_att_head_on_cached_maps_equals_training_on_images(tmp_path, cifar_root):
    """The same batches, the same head: with float32 maps the cache changes nothing but the batch
    size of the backbone's forward pass (a few float32 ulps). float16 storage adds a relative
    rounding of 2^-11 to the inputs (bounded in test_cached_features_equal_the_backbone_on_the_images),
    which a random backbone's unnormalised activations and tiny BatchNorm batches amplify chaotically."""
    cached_run = head_run(tmp_path, "resnet_att", "cached", "--cache-dtype", "float32")
    images_run = head_run(tmp_path, "resnet_att", "images", "--no-probe")
    assert "head training on cached features" in cached_run.stdout
    assert "cached features" not in images_run.stdout
    a = torch.load(tmp_path / "ck" / "cached" / "last.pth", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "ck" / "images" / "last.pth", weights_only=True)["state_dict"]
    worst = max((a[k] - b[k]).abs().max().item() / max(b[k].abs().max().item(), 1.0)
                for k in a if k.startswith("head.") and a[k].is_floating_point())
    print("max relative head difference:", worst)
    assert worst <= 1e-4, worst
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("head."))  # the frozen backbone
    losses = [re.findall(r"Train loss : ([0-9.]+)", p.stdout) for p in (cached_run, images_run)]
    assert np.allclose(np.float64(losses[0]), np.float64(losses[1]), rtol=1e-4), losses


@pytest.mark.parametrize("model", ["resnet", "resnet_att"])
def test_test_accuracy_through_the_cache_is_the_full_models(model, tmp_path, cifar_root):
    run = head_run(tmp_path, model, "r")
    best = {"resnet": "ResNet.pth", "resnet_att": "ResNet_att.pth"}[model]
    proc = run_script("evaluate.py", tmp_path / "ck" / "r" / best, "--data-dir", cifar_root, "--no-download",
                      "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    through_cache = re.findall(r"^Test Acc : ([0-9.]+)$", run.stdout, re.M)
    on_images = re.findall(r"^Test Acc : ([0-9.]+)$", proc.stdout, re.M)
    assert through_cache == on_images and len(on_images) == 1
    # a second run of the same command: every split from the cache, nothing computed
    again = head_run(tmp_path, model, "r2")
    assert "computing the frozen backbone" not in again.stdout and again.stdout.count("from the cache") == 3


def test_cached_head_resume_with_adamw_is_bit_identical(tmp_path, cifar_root):
    """resnet's head trains with AdamW on cached features: stopped after epoch 1 and resumed, it
    ends with the uninterrupted run's weights and optimizer state, bit for bit."""
    full = head_run(tmp_path, "resnet", "full")
    head_run(tmp_path, "resnet", "cut", "--stop-after", "1")
    proc = run_script("train.py", "--resume", tmp_path / "ck" / "cut" / "last.pth", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = torch.load(tmp_path / "ck" / "cut" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "ck" / "full" / "last.pth", weights_only=True)
    assert a["args"]["optimizer"] == "adamw"
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    for i, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][i][k])), (i, k)
    assert re.findall(r"Test Acc : (\S+)", proc.stdout) == re.findall(r"Test Acc : (\S+)", full.stdout)
