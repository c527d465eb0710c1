"""Issue 39: your own images. The folder layout, the decoded-once uint8 cache, any number of
classes through train/evaluate/explain/export, bad files, and the proof that a CIFAR-10 folder is
the same pipeline as the binary files, bit for bit."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import folders
from conftest import ROOT, child_env, run_script
from imagefolder import CLASSES, picture, write_bad_files, write_folder
from utils import UserError

TINY = ["--image-size", "32", "--epochs", "1", "--batch-size", "16"]


def lines(log):
    messages = []
    return messages, messages.append


# ----------------------------------------------------------------------------------------------
# 1. The layout


def test_layout_classes_files_and_order(tmp_path):
    """Classes as find_classes sorts them, hidden folders and files and non-images left out,
    nested folders and upper-case extensions in; images ordered by name, then class."""
    for cls in ("zebra", "ant"):
        os.makedirs(tmp_path / "train" / cls / "nested")
        for name in ("2.png", "1.JPG", "nested/0.jpeg", ".hidden.png", "notes.txt"):
            picture(0, np.random.default_rng(0), (16, 16)).save(tmp_path / "train" / cls / name,
                                                                format="PNG")
    os.makedirs(tmp_path / "train" / ".ipynb_checkpoints")
    layout = folders.scan(str(tmp_path))
    assert layout.classes == ["ant", "zebra"]
    assert layout.files["val"] is None and layout.files["test"] is None
    assert layout.files["train"] == [(f"train/{c}/{n}", label) for n in ("1.JPG", "2.png", "nested/0.jpeg")
                                     for label, c in enumerate(("ant", "zebra"))]


@pytest.mark.parametrize("case, message", [
    ("empty class", "holds no images"),
    ("one class", "at least two are needed"),
    ("val class train lacks", "class folder(s) that train/ lacks: owl"),
    ("no images", "holds no images"),
])
def test_unusable_layouts_are_one_line_exit_2_before_training(tmp_path, case, message):
    root = tmp_path / "photos"
    write_folder(str(root), per_class=2, splits=("train", "val"))
    if case == "empty class":
        os.makedirs(root / "train" / "owl")
    elif case == "one class":
        for c in CLASSES[1:]:
            for split in ("train", "val"):
                for f in os.listdir(root / split / c):
                    os.remove(root / split / c / f)
                os.rmdir(root / split / c)
    elif case == "val class train lacks":
        os.makedirs(root / "val" / "owl")
        picture(0, np.random.default_rng(0), (16, 16)).save(root / "val" / "owl" / "0.png")
    elif case == "no images":
        for c in CLASSES:
            for f in os.listdir(root / "val" / c):
                os.rename(root / "val" / c / f, root / "val" / c / (f + ".txt"))
    started = time.time()
    r = run_script("train.py", "--model", "sample_resnet", "--data-dir", root, *TINY, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "checkpoints"), "nothing may be written before the layout is checked"
    assert time.time() - started < 60


def test_holdout_is_a_fraction_of_each_class_without_val(tmp_path):
    labels = np.repeat([0, 1, 2], [30, 7, 2])
    train, val = data.split_train_val(labels, 0.1, seed=0)
    assert np.bincount(labels[val]).tolist() == [3, 1, 1]  # round(10%), at least one
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    with pytest.raises(UserError, match="leaves no training images of class 2"):
        data.split_train_val(np.repeat([0, 1, 2], [30, 7, 1]), 0.1, seed=0)


def test_val_folder_is_the_validation_set_and_no_test_folder_means_no_test(tmp_path):
    root = tmp_path / "photos"
    write_folder(str(root), per_class=8, splits=("train", "val"))
    splits = data.get_splits(str(root), val_split=0.5, image_size=32, cache_dir=str(tmp_path / "cache"))
    assert len(splits["train"][1]) == 24 and len(splits["val"][1]) == 24 and splits["test"] is None
    r = run_script("train.py", "--model", "sample_resnet", "--data-dir", root, *TINY, "--run-name", "r",
                   "--val-split", "0.5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "no test pass" in r.stdout and "24 train / 24 val / 0 test images" in r.stdout
    assert f"--val-split 0.5 is not used: {root / 'val'} holds the validation images" in r.stdout  # not silently
    assert os.path.isfile(tmp_path / "checkpoints" / "r" / "Sample_ResNet.pth")
    assert not os.path.exists(tmp_path / "log" / "r-test.npz")


# ----------------------------------------------------------------------------------------------
# 2. Decoded once, memory-mapped, keyed by the files


def test_modes_decode_to_rgb_and_16_bit_is_scaled_not_clipped(tmp_path):
    gray = np.arange(256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(gray * 257).save(tmp_path / "g16.png")
    out = folders.decode(str(tmp_path / "g16.png"), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], gray.astype(np.uint8)) and np.array_equal(out[..., 2], gray.astype(np.uint8))
    rgb = picture(1, np.random.default_rng(0), (40, 20))
    for mode in ("RGBA", "P", "CMYK", "L", "LA"):
        path = tmp_path / f"x-{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        rgb.convert(mode).save(path)
        assert folders.decode(str(path), 12).shape == (12, 12, 3), mode


def test_base_size_is_the_image_size_capped_by_the_images(tmp_path):
    assert folders.base_size(224, [300, 500, None]) == 224  # the seed's Resize(224), done once
    assert folders.base_size(224, [32, 32]) == 32  # never upsampled in the cache
    assert folders.base_size(224, [100, 150]) == 150
    assert folders.base_size(32, [100]) == 32
    write_folder(str(tmp_path / "p"), per_class=2, size_range=(40, 60))
    found = folders.load(str(tmp_path / "p"), 224, str(tmp_path / "cache"), log=lambda m: None)
    largest = max(min(Image.open(os.path.join(tmp_path, "p", p)).size) for p, _ in
                  folders.scan(str(tmp_path / "p")).files["train"])
    assert found.base == largest and found.splits["train"][0].shape[1:] == (largest, largest, 3)


def test_cache_is_reused_and_a_changed_folder_rebuilds_saying_why(tmp_path):
    root, cache = str(tmp_path / "p"), str(tmp_path / "cache")
    write_folder(root, per_class=4)
    said, log = lines(None)
    first = folders.load(root, 32, cache, log=log)
    images_file = os.path.join(first.folder, "images.u8")
    stamp = os.stat(images_file).st_mtime_ns
    second = folders.load(root, 32, cache, log=log)
    assert os.stat(images_file).st_mtime_ns == stamp and np.array_equal(np.asarray(first.splits["train"][0]),
                                                                        np.asarray(second.splits["train"][0]))
    picture(2, np.random.default_rng(5), (30, 30)).save(os.path.join(root, "train", "cat", "000.jpg"))
    os.remove(os.path.join(root, "train", "dog", "001.png"))
    said.clear()
    third = folders.load(root, 32, cache, log=log)
    assert any("1 file(s) removed, 1 file(s) changed" in m and "rebuilding" in m for m in said), said
    assert len(third.splits["train"][1]) == 11


def test_rows_are_read_per_batch_and_give_the_in_memory_batches(tmp_path):
    root = str(tmp_path / "p")
    write_folder(root, per_class=6)
    rows, labels = folders.load(root, 32, str(tmp_path / "cache"), log=lambda m: None).splits["train"]
    loader = data.TensorLoader(rows, labels, 8, 40, train=True, device="cpu", seed=3)
    assert isinstance(loader.images, folders.ImageRows), "the cache must stay on disk, not become one tensor"
    in_memory = data.TensorLoader(np.asarray(rows), labels, 8, 40, train=True, device="cpu", seed=3)
    for (a, ya), (b, yb) in zip(loader, in_memory):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    picked = rows.take(np.array([5, 1, 3]))
    assert np.array_equal(picked[np.array([2, 0])], np.asarray(rows)[[3, 5]])


SLOW_CACHING = """
import sys, time
sys.path.insert(0, {root!r})
import folders
folders.CHUNK = 4
real = folders.decode
def slow(path, base):
    time.sleep(0.05)
    return real(path, base)
folders.decode = slow
folders.load({folder!r}, 32, {cache!r})
"""


def test_kill_9_while_caching_resumes_and_gives_the_same_cache(tmp_path, monkeypatch):
    root, cache = str(tmp_path / "p"), str(tmp_path / "cache")
    write_folder(root, per_class=12)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CACHING.format(root=ROOT, folder=root, cache=cache)],
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = folders.cache_folder(cache, root, 32) + ".partial"
    deadline = time.time() + 60
    while time.time() < deadline:
        state = folders.read_json(os.path.join(partial, "progress.json"))
        if state and len(state["chunks"]) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state and 2 <= len(state["chunks"]) < 9, "killed too late to test a resume"
    assert not os.path.exists(folders.cache_folder(cache, root, 32)), "a half-written cache must not be in place"
    said, log = lines(None)
    monkeypatch.setattr(folders, "CHUNK", 4)  # the killed process's chunks (another size starts over)
    resumed = folders.load(root, 32, cache, log=log)
    assert any("resuming" in m for m in said), said
    fresh = folders.load(root, 32, str(tmp_path / "fresh"), log=lambda m: None)
    assert np.array_equal(np.asarray(resumed.splits["train"][0]), np.asarray(fresh.splits["train"][0]))


class StopAfter:
    """A utils.StopSignals whose ^C arrives after ``n`` chunks."""

    def __init__(self, n):
        self.n = n

    def exit_if_requested(self, what):
        self.n -= 1
        if self.n < 0:
            raise UserError(f"stopped by SIGINT {what}", exit_code=130)


def test_ctrl_c_while_caching_stops_in_one_line_and_another_chunk_size_starts_over(tmp_path, monkeypatch):
    root, cache = str(tmp_path / "p"), str(tmp_path / "cache")
    write_folder(root, per_class=8)
    monkeypatch.setattr(folders, "CHUNK", 4)
    with pytest.raises(UserError, match="2 of 6 chunks are cached .* the same command continues") as e:
        folders.load(root, 32, cache, log=lambda m: None, stop=StopAfter(2))
    assert e.value.exit_code == 130
    monkeypatch.setattr(folders, "CHUNK", 5)  # chunks recorded at 4 images mean nothing at 5
    said, log = lines(None)
    again = folders.load(root, 32, cache, log=log)
    assert not any("resuming" in m for m in said), said
    fresh = folders.load(root, 32, str(tmp_path / "fresh"), log=lambda m: None)
    assert np.array_equal(np.asarray(again.splits["train"][0]), np.asarray(fresh.splits["train"][0]))


# ----------------------------------------------------------------------------------------------
# 4. Bad files


BAD_KINDS = ("truncated", "empty", "text", "one-pixel", "bomb", "corrupt")


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_each_bad_file_is_skipped_counted_named_and_listed(tmp_path, kind):
    root = tmp_path / "p"
    write_folder(str(root), per_class=3)
    bad = write_bad_files(str(tmp_path / "bad"))[kind]
    os.rename(bad, root / "train" / "dog" / os.path.basename(bad))
    said, log = lines(None)
    found = folders.load(str(root), 32, str(tmp_path / "cache"), log=log)
    assert found.skipped == 1 and len(found.splits["train"][1]) == 9
    warning = [m for m in said if m.startswith("warning: skipped 1 of 10 files")]
    assert warning and os.path.basename(bad) in warning[0], said
    with open(os.path.join(found.folder, "skipped.txt")) as f:
        assert f.read().startswith(f"train/dog/{os.path.basename(bad)}\t")
    with pytest.raises(UserError, match=r"--strict"):
        folders.load(str(root), 32, str(tmp_path / "strict"), strict=True, log=log)


def test_a_class_whose_images_are_all_bad_is_one_line(tmp_path):
    root = tmp_path / "p"
    write_folder(str(root), per_class=2)
    for f in os.listdir(root / "train" / "fox"):
        with open(root / "train" / "fox" / f, "w") as out:
            out.write("text")
    with pytest.raises(UserError, match="no usable images of class fox") as e:
        folders.load(str(root), 32, str(tmp_path / "cache"), log=lambda m: None)
    assert e.value.exit_code == 2


# ----------------------------------------------------------------------------------------------
# 3. Any number of classes, everywhere (the "as a new user would", small)


THREE_CLASS_RUNS = {  # model: (train.py options, best checkpoint)
    "sample_resnet": ([], "Sample_ResNet.pth"),
    "resnet_att": (["--no-augment"], "ResNet_att.pth"),  # frozen: cached features
    "resnet_scratch": ([], "ResNet_scratch.pth"),
}


@pytest.mark.parametrize("model", [
    "sample_resnet", pytest.param("resnet_att", marks=pytest.mark.slow),
    pytest.param("resnet_scratch", marks=pytest.mark.slow)])
def test_three_classes_train_evaluate_explain_export(tmp_path, weights_path, model):
    """Mixed images of three classes with bad files: a model trains one epoch; evaluate, explain
    and the release name the three classes; the checkpoint is refused on a folder of other
    classes; no traceback anywhere."""
    root = tmp_path / "photos"
    write_folder(str(root), per_class=20, splits=("train", "test"), size_range=(24, 120))
    for kind, path in write_bad_files(str(tmp_path / "bad")).items():
        os.rename(path, root / "train" / "cat" / os.path.basename(path))
    outputs = []
    for extra, best in [THREE_CLASS_RUNS[model]]:
        r = run_script("train.py", "--model", model, "--data-dir", root, "--weights", weights_path, *TINY, *extra,
                       "--run-name", model, cwd=tmp_path)
        outputs.append(r.stdout + r.stderr)
        assert r.returncode == 0, r.stderr
        assert "warning: skipped 6 of 126 files" in r.stdout
        assert "data: folder:photos, 3 classes, 54 train / 6 val / 60 test images" in r.stdout
        ckpt = tmp_path / "checkpoints" / model / best
        r = run_script("evaluate.py", ckpt, cwd=tmp_path)
        outputs.append(r.stdout + r.stderr)
        assert r.returncode == 0, r.stderr
        assert "60 test images" in r.stdout and all(f"\n{c} " in r.stdout for c in CLASSES)
        pred = np.load(tmp_path / "checkpoints" / model / best.replace(".pth", "-test.npz"))
        assert pred["probs"].shape == (60, 3)
    r = run_script("explain.py", ckpt, "--test", "3", "--out", tmp_path / "maps.png", cwd=tmp_path)
    outputs.append(r.stdout + r.stderr)
    assert r.returncode == 0 and "predicted" in r.stdout and any(f"true {c}" in r.stdout for c in CLASSES)
    r = run_script("export.py", ckpt, "--out", tmp_path / "release.pth", cwd=tmp_path)
    outputs.append(r.stdout + r.stderr)
    assert r.returncode == 0, r.stderr
    import checkpoints
    _, info = checkpoints.load_model(str(tmp_path / "release.pth"))
    assert info["classes"] == list(CLASSES)
    other = tmp_path / "other"
    write_folder(str(other), per_class=2, splits=("train", "test"))
    os.rename(other / "train" / "fox", other / "train" / "owl")
    os.rename(other / "test" / "fox", other / "test" / "owl")
    r = run_script("evaluate.py", ckpt, "--data-dir", other, cwd=tmp_path)
    outputs.append(r.stderr)
    assert r.returncode == 2 and "not in the data: fox; not in the checkpoint: owl" in r.stderr
    assert not any("Traceback" in o for o in outputs)


def test_checkpoints_hold_any_number_of_classes_but_not_a_mismatch():
    import checkpoints
    from models import build_model
    model, cfg = build_model("sample_resnet", num_classes=3)
    ckpt = {"model": cfg, "classes": list(CLASSES), "state_dict": model.state_dict(), "args": {}, "image_size": 32,
            "epoch": 1, "best_val_acc": 0.5, "run_name": "r"}
    assert checkpoints.network_problem(ckpt) is None
    for classes in (["cat", "dog"], ["cat", "cat", "fox"]):
        assert "classes" in checkpoints.network_problem({**ckpt, "classes": classes})


# ----------------------------------------------------------------------------------------------
# 5. CIFAR-10 as a folder is the same pipeline


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory, cifar_root):
    out = tmp_path_factory.mktemp("cifar-png") / "cifar10"
    r = run_script("tools/cifar_to_folder.py", "--data-dir", cifar_root, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def test_cifar_as_a_folder_equals_the_binary_files_bit_for_bit(tmp_path, cifar_root, cifar_folder, cifar):
    import checkpoints
    cache = tmp_path / "cache"
    found = folders.load(str(cifar_folder), 32, str(cache), log=lambda m: None)
    assert found.classes == list(data.CLASSES) and found.base == 32
    for split, (x, y) in (("train", cifar[:2]), ("test", cifar[2:])):
        assert np.array_equal(np.asarray(found.splits[split][0]), x) and np.array_equal(found.splits[split][1], y)
    common = ["--model", "sample_resnet", "--image-size", "32", "--epochs", "1", "--train-subset", "512",
              "--val-split", "5000", "--test-subset", "500", "--batch-size", "64", "--seed", "7",
              "--cache-dir", cache, "--device", "cpu"]
    runs = {}
    for name, where in (("bin", cifar_root), ("png", cifar_folder)):
        r = run_script("train.py", *common, "--data-dir", where, "--run-name", name, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        runs[name] = checkpoints.load_checkpoint(str(tmp_path / "checkpoints" / name / "last.pth"))
    for key, value in runs["bin"]["state_dict"].items():
        assert torch.equal(value, runs["png"]["state_dict"][key]), key
    a, b = (np.load(tmp_path / "log" / f"{n}-test.npz") for n in ("bin", "png"))
    assert np.array_equal(a["probs"], b["probs"]) and np.array_equal(a["indices"], b["indices"])
    assert json.loads(str(b["meta"]))["dataset"] == "folder:cifar10"


# ----------------------------------------------------------------------------------------------
# Any bytes in the cache's own files, and in the images


def test_any_bytes_in_the_cache_files_rebuild_it_never_a_traceback(tmp_path, monkeypatch):
    root, cache = str(tmp_path / "p"), str(tmp_path / "cache")
    write_folder(root, per_class=4)
    good = np.asarray(folders.load(root, 32, cache, log=lambda m: None).splits["train"][0])
    folder = folders.cache_folder(cache, root, 32)
    rng = np.random.default_rng(0)
    for name in ("meta.json", "labels.npy", "usable.npy", "images.u8"):
        for trial in range(4):
            with open(os.path.join(folder, name), "rb") as f:
                whole = f.read()
            mutated = bytearray(whole)
            if trial == 0:
                mutated = mutated[:len(mutated) // 2]
            elif trial == 1:
                mutated = bytearray(rng.integers(0, 256, len(whole), dtype=np.uint8).tobytes())
            else:
                for i in rng.integers(0, len(whole), 8):
                    mutated[i] ^= 0xFF
            with open(os.path.join(folder, name), "wb") as f:
                f.write(bytes(mutated))
            said, log = lines(None)
            again = np.asarray(folders.load(root, 32, cache, log=log).splits["train"][0])
            if name == "images.u8" and trial >= 1:  # same size, other pixels: pixels carry no checksum
                continue
            assert np.array_equal(again, good), (name, trial, said)
    # a damaged progress.json of an interrupted build starts it over
    monkeypatch.setattr(folders, "CHUNK", 4)
    partial = folder + ".partial"
    os.makedirs(partial)
    for junk in (b"", b"{", b'{"fields": 1}', b"[1, 2]", json.dumps({"fields": None, "chunks": {"0": [[99, 1]]}}).encode()):
        with open(os.path.join(partial, "progress.json"), "wb") as f:
            f.write(junk)
        assert folders.resumable(partial, {"format": 1}) == (None, None)


def test_any_bytes_in_an_image_file_decode_or_give_one_reason(tmp_path):
    """Random, truncated and bit-flipped JPEG/PNG bytes: a uint8 image or BadImage, nothing else."""
    rng = np.random.default_rng(1)
    sources = []
    for ext in ("jpg", "png"):
        path = tmp_path / f"src.{ext}"
        picture(1, rng, (40, 30)).save(path)
        sources.append(path.read_bytes())
    outcomes = {"decoded": 0, "bad": 0}
    for trial in range(120):
        whole = bytearray(sources[trial % 2])
        kind = trial % 3
        if kind == 0:
            whole = whole[:int(rng.integers(0, len(whole)))]
        elif kind == 1:
            for i in rng.integers(0, len(whole), 6):
                whole[i] = int(rng.integers(0, 256))
        else:
            whole = whole[:32] + rng.integers(0, 256, 500, dtype=np.uint8).tobytes()
        path = tmp_path / f"f{trial}.{'jpg' if trial % 2 == 0 else 'png'}"
        path.write_bytes(bytes(whole))
        try:
            out = folders.decode(str(path), 16)
            assert out.shape == (16, 16, 3) and out.dtype == np.uint8
            outcomes["decoded"] += 1
        except folders.BadImage as e:
            assert str(e) and "\n" not in str(e)
            outcomes["bad"] += 1
    assert outcomes["bad"] > 20, outcomes


# ----------------------------------------------------------------------------------------------
# Resume and torchrun work unchanged on a folder


def test_a_folder_run_resumes_bit_identical_and_refuses_other_classes(tmp_path):
    """At 72 px from images of 72-90 px: the cache is at 72 px, above data.KERNEL_SIDE, so the
    batches come from torch's uint8 kernels (as at 224 px), and a resumed run still equals the
    uninterrupted one bit for bit."""
    root = tmp_path / "photos"
    write_folder(str(root), per_class=8, splits=("train", "test"), size_range=(72, 90))
    common = ["--model", "sample_resnet", "--data-dir", root, "--image-size", "72", "--epochs", "2",
              "--batch-size", "8", "--val-every", "1", "--device", "cpu"]
    full = run_script("train.py", *common, "--run-name", "full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    (cache,) = (tmp_path / "cache" / "images").glob("photos-*-72px")
    assert (cache / "images.u8").stat().st_size == (24 + 24) * 72 * 72 * 3 and data.uses_kernels(72, "cpu")
    split = run_script("train.py", *common, "--run-name", "split", "--stop-after", "1", cwd=tmp_path)
    assert split.returncode == 0 and "Test Acc" not in split.stdout, split.stderr
    last = tmp_path / "checkpoints" / "split" / "last.pth"
    other = tmp_path / "other"
    write_folder(str(other), per_class=2)
    os.rename(other / "train" / "fox", other / "train" / "owl")
    before = last.read_bytes()
    refused = run_script("train.py", "--resume", last, "--data-dir", other, cwd=tmp_path)
    assert refused.returncode == 2 and "not in the data: fox; not in the checkpoint: owl" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and last.read_bytes() == before
    resumed = run_script("train.py", "--resume", last, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    import checkpoints
    a, b = (checkpoints.load_checkpoint(str(tmp_path / "checkpoints" / n / "last.pth")) for n in ("split", "full"))
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a["classes"] == list(CLASSES)


def test_torchrun_on_a_folder_builds_the_cache_once(tmp_path):
    from test_ddp import torchrun
    root = tmp_path / "photos"
    write_folder(str(root), per_class=12, splits=("train", "test"))
    write_bad_files(str(root / "train" / "cat"))
    proc = torchrun("--model", "sample_resnet", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
                    "--device", "cpu", "--data-dir", root, "--out", tmp_path / "ck", "--log-dir", tmp_path / "log",
                    "--cache-dir", tmp_path / "cache", "--run-name", "ddp")
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert stdout.count("warning: skipped 6 of 78 files") == 1 and stdout.count("Test Acc : ") == 1
    assert len(os.listdir(tmp_path / "cache" / "images")) == 1  # one cache, whole (no .partial left)
