"""train.py and evaluate.py run as a user runs them (issue 3): subprocesses, real CIFAR-10, files
under tmp_path. What is checked: learning, the seed's log lines, the CSV, the curves, the
checkpoints (content, selection on validation only), evaluate.py agreeing with train.py, every
model end to end, --dry-run counts, bit-identical resume (epoch boundary and mid-epoch SIGINT),
the linear probe against the same training without it, and evaluate.py --images."""
import csv
import io
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

from conftest import ROOT, child_env, run_script
import data
from models import MODELS, build_model, count_parameters

MODEL_NAMES = ["sample_resnet", "resnet", "resnet_scratch", "resnet_att", "resnet_att_scratch"]
# the best checkpoint is named as the seed named it (issue 3)
BEST_NAMES = {"sample_resnet": "Sample_ResNet.pth", "resnet": "ResNet.pth", "resnet_scratch": "ResNet_scratch.pth",
              "resnet_att": "ResNet_att.pth", "resnet_att_scratch": "ResNet_att_scratch.pth"}
CSV_HEADER = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUM = r"([0-9]+\.[0-9]+)"
# one step of one epoch at 32 px: the smallest run that still trains, validates and tests
TINY = ["--image-size", "32", "--epochs", "1", "--train-subset", "16", "--batch-size", "16",
        "--val-split", "10", "--test-subset", "10"]


# ----------------------------------------------------------------------------------------------
# helpers


def train(tmp, *args, env=None):
    """train.py with its checkpoints and logs under ``tmp``; --data-dir from $CIFAR10_ROOT."""
    return run_script("train.py", "--out", tmp / "ck", "--log-dir", tmp / "log", *args, cwd=tmp, env=env)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def seed_lines(text):
    """The seed's lines, in order, from a console or log text."""
    pat = re.compile(r"^(epoch: \d+|Train loss : \S+    Train Acc : \S+|Val loss : \S+    Val Acc : \S+|"
                     r"best accuracy is \S+|Test Acc : \S+)$")
    return [ln for ln in text.splitlines() if pat.match(ln)]


def printed_test_acc(text):
    found = re.findall(rf"^Test Acc : {NUM}$", text, re.M)
    assert len(found) == 1, text[-2000:]
    return found[0]


def assert_same_tensors(a, b, what):
    assert a.keys() == b.keys(), what
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} of {len(a)} tensors differ, e.g. {differ[:5]}"


def optimizer_tensors(opt_state):
    return {f"{i}.{k}": v for i, s in opt_state["state"].items() for k, v in s.items() if torch.is_tensor(v)}


def assert_plain(obj, where="checkpoint"):
    """Only tensors and plain Python types, all the way down."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, (str, int)), f"{where}: key {k!r}"
            assert_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            assert_plain(v, f"{where}[{i}]")
    else:
        assert obj is None or isinstance(obj, (str, int, float, bool, torch.Tensor)), f"{where}: {type(obj)}"


def assert_real_png(path, min_side=200):
    with open(path, "rb") as f:
        raw = f.read()
    assert raw[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(raw) > 10_000, f"{path}: only {len(raw)} bytes"
    img = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    assert min(img.shape[:2]) >= min_side, img.shape
    # matplotlib drew something: many colours (lines, text, antialiasing), not a blank canvas
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20
    assert (img < 128).any() and (img > 128).any()


# ----------------------------------------------------------------------------------------------
# end to end on real data: sample_resnet, 2 epochs at 32 px on 5,000 images (one run, shared)

E2E_TRAIN, E2E_VAL, E2E_TEST, E2E_BATCH = 5000, 1000, 2000, 128


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, cifar_root):
    tmp = tmp_path_factory.mktemp("e2e")
    started = time.time()
    proc = ok(train(tmp, "--model", "sample_resnet", "--image-size", "32", "--epochs", "2",
                    "--train-subset", E2E_TRAIN, "--val-split", E2E_VAL, "--test-subset", E2E_TEST,
                    "--val-every", "1", "--no-download", env={"CIFAR10_ROOT": cifar_root}))
    runs = os.listdir(tmp / "ck")
    assert len(runs) == 1, runs
    run = runs[0]
    assert re.fullmatch(r"sample_resnet-\d{8}-\d{6}", run), run  # <model>-<timestamp>
    return SimpleNamespace(tmp=tmp, proc=proc, run=run, run_dir=tmp / "ck" / run, log_base=tmp / "log" / run,
                           seconds=time.time() - started)


def test_e2e_learns_and_logs_the_seed_lines(e2e):
    out = e2e.proc.stdout
    acc = float(printed_test_acc(out))
    # measured on this 2-core CPU: Test Acc 0.4415 (val 0.3500 after epoch 1, 0.4350 after epoch 2),
    # ~22 s for the run; chance is 0.10
    assert acc > 0.30, out[-2000:]
    with open(f"{e2e.log_base}.log") as f:
        logged = f.read()
    lines = seed_lines(logged)
    kinds = [ln.split(" ")[0] for ln in lines]
    assert kinds == ["epoch:", "Train", "Val", "best", "epoch:", "Train", "Val", "best", "Test"], lines
    assert lines[0] == "epoch: 1" and lines[4] == "epoch: 2"
    for ln in lines[1:4] + lines[5:]:
        for value in re.findall(r": (\S+)|is (\S+)", ln):
            v = float("".join(value))
            assert np.isfinite(v) and v >= 0, ln
    # the console says the same as the log file, and the best accuracy is the running max
    assert seed_lines(out) == lines
    val = [float(ln.split()[-1]) for ln in lines if ln.startswith("Val")]
    best = [float(ln.split()[-1]) for ln in lines if ln.startswith("best")]
    assert best == [max(val[:i + 1]) for i in range(len(val))]
    assert lines[-1] == f"Test Acc : {acc:.4f}"
    # training learned within the run: epoch 2's training loss is below epoch 1's
    train_loss = [float(ln.split()[3]) for ln in lines if ln.startswith("Train")]
    assert train_loss[1] < train_loss[0]


def test_e2e_csv(e2e):
    header, rows = read_csv(f"{e2e.log_base}.csv")
    assert header == CSV_HEADER
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    with open(f"{e2e.log_base}.log") as f:
        logged = f.read()
    train_log = re.findall(rf"^Train loss : {NUM}    Train Acc : {NUM}$", logged, re.M)
    val_log = re.findall(rf"^Val loss : {NUM}    Val Acc : {NUM}$", logged, re.M)
    for r, (tl, ta), (vl, va) in zip(rows, train_log, val_log):
        assert abs(float(r["train_loss"]) - float(tl)) < 1e-4 and abs(float(r["train_acc"]) - float(ta)) < 1e-4
        assert abs(float(r["val_loss"]) - float(vl)) < 1e-4 and abs(float(r["val_acc"]) - float(va)) < 1e-4
        assert float(r["seconds"]) > 0 and float(r["images_per_s"]) > 0
        # images per second times seconds: the epoch's training images (full batches: last one dropped)
        images = float(r["images_per_s"]) * float(r["seconds"])
        assert abs(images - E2E_TRAIN // E2E_BATCH * E2E_BATCH) < 0.05 * E2E_TRAIN, r
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] > 0 and lrs[1] < lrs[0]  # the schedule decays


def test_e2e_curves_png(e2e):
    assert_real_png(f"{e2e.log_base}.png")


def test_e2e_checkpoints(e2e):
    best_path, last_path = e2e.run_dir / BEST_NAMES["sample_resnet"], e2e.run_dir / "last.pth"
    files = os.listdir(e2e.run_dir)
    assert sorted(f for f in files if f.endswith(".pth")) == sorted([BEST_NAMES["sample_resnet"], "last.pth"])
    assert not [f for f in files if f.startswith(".") or ".tmp" in f], files  # atomic writes left no temporaries
    best, last = load(best_path), load(last_path)
    fresh, _ = build_model("sample_resnet", weights="none")
    fresh_state = fresh.state_dict()
    _, rows = read_csv(f"{e2e.log_base}.csv")
    val_accs = [float(r["val_acc"]) for r in rows]
    for ckpt in (best, last):
        assert_plain(ckpt)
        state = ckpt["state_dict"]
        assert not [k for k in state if k.startswith(("module.", "_orig_mod.")) or "._orig_mod." in k]
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in fresh_state.items()}
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
        assert ckpt["model"]["name"] == "sample_resnet" and "stride_in_1x1" in ckpt["model"]
        assert ckpt["image_size"] == 32
        assert list(ckpt["classes"]) == list(data.CLASSES)
        assert {"state", "param_groups"} <= ckpt["optimizer"].keys() and ckpt["optimizer"]["state"]
        assert isinstance(ckpt["scheduler"], dict) and ckpt["scheduler"]["last_epoch"] > 0
        args = ckpt["args"]
        assert isinstance(args, dict)
        assert (args["model"], args["epochs"], args["image_size"], args["train_subset"], args["val_split"]) == \
            ("sample_resnet", 2, 32, E2E_TRAIN, E2E_VAL)
        assert ckpt["versions"]["torch"] == str(torch.__version__)
        assert ckpt["versions"]["torchvision"] == str(torchvision.__version__)
        # the best validation accuracy so far is the max of the CSV's val_acc column
        assert abs(ckpt["best_val_acc"] - max(val_accs[:ckpt["epoch"]])) < 1e-5
    assert last["epoch"] == 2
    # model selection: the best checkpoint is the first epoch with the highest validation accuracy
    assert best["epoch"] == int(np.argmax(val_accs)) + 1
    assert abs(best["best_val_acc"] - max(val_accs)) < 1e-5
    assert f"best checkpoint: epoch {best['epoch']}, val acc {best['best_val_acc']:.4f}" in e2e.proc.stdout
    if best["epoch"] == last["epoch"]:
        assert_same_tensors(best["state_dict"], last["state_dict"], "best vs last of the same epoch")
    # the checkpoint alone rebuilds the network (strict load)
    rebuilt, _ = build_model(best["model"]["name"], weights="none", stride_in_1x1=best["model"]["stride_in_1x1"])
    rebuilt.load_state_dict(best["state_dict"])


def test_e2e_test_predictions(e2e, cifar):
    """Issue 32: the final test writes every test image's probabilities beside the log, the images
    the run's seeded --test-subset picked, in that order, adding up to the printed accuracy."""
    import report
    pred = report.read_predictions(f"{e2e.log_base}-test.npz")
    _, _, _, test_y = cifar
    indices = data.test_indices(E2E_TEST, 0)
    assert np.array_equal(pred["indices"], indices) and np.array_equal(pred["labels"], test_y[indices])
    assert f"{pred['correct'].mean():.4f}" == printed_test_acc(e2e.proc.stdout)
    meta = pred["meta"]
    assert (meta["dataset"], meta["classes"], meta["run"], meta["seed"]) == ("cifar10", list(data.CLASSES), e2e.run, 0)
    assert meta["settings"]["model"] == "sample_resnet" and meta["settings"]["test_subset"] == E2E_TEST
    assert meta["checkpoint"] == BEST_NAMES["sample_resnet"] and meta["epoch"] == load(
        e2e.run_dir / BEST_NAMES["sample_resnet"])["epoch"]


def test_evaluate_prints_train_accuracy_table_and_confusion(e2e, cifar_root):
    best_path = e2e.run_dir / BEST_NAMES["sample_resnet"]
    proc = ok(run_script("evaluate.py", best_path, "--data-dir", cifar_root, "--no-download", cwd=e2e.tmp))
    out = proc.stdout
    assert printed_test_acc(out) == printed_test_acc(e2e.proc.stdout)  # the same number train.py printed
    rows = re.findall(r"^(\w+)\s+(\d+)\s+(\d+)\s+" + NUM + "$", out, re.M)
    assert [r[0] for r in rows] == list(data.CLASSES)
    correct, total = sum(int(r[1]) for r in rows), sum(int(r[2]) for r in rows)
    assert total == E2E_TEST
    assert f"{correct / total:.4f}" == printed_test_acc(out)
    for name, c, t, a in rows:
        assert 0 <= int(c) <= int(t) and abs(float(a) - int(c) / int(t)) < 1e-4
    png = re.findall(r"^confusion matrix: (.+)$", out, re.M)
    assert len(png) == 1
    assert_real_png(png[0])
    run, file = best_path.parts[-2:]
    assert Image.open(png[0]).text["Title"] == (f"{run}/{file} (sample_resnet, epoch {load(best_path)['epoch']}):\n"
                                                f"test accuracy {printed_test_acc(out)} on {total:,} images")
    # issue 32: calibration (ECE and its reliability diagram) and the per-image predictions, the
    # same probabilities train.py's own test wrote (same checkpoint, same images)
    import report
    import stats
    npz = re.findall(r"^test predictions: (.+)$", out, re.M)
    pred, trained = report.read_predictions(npz[0]), report.read_predictions(f"{e2e.log_base}-test.npz")
    assert np.array_equal(pred["indices"], trained["indices"]) and np.array_equal(pred["predicted"], trained["predicted"])
    np.testing.assert_allclose(pred["probs"], trained["probs"], atol=2e-3)  # float16, batches of other sizes
    ece = stats.calibration(pred["probs"], pred["labels"], pred["predicted"]).ece
    assert re.search(rf"^Calibration: ECE {ece:.4f} \(15 bins\)", out, re.M), out
    png = re.findall(r"^reliability diagram: (.+)$", out, re.M)
    assert_real_png(png[0])
    assert Image.open(png[0]).text["Title"].endswith(f"ECE {ece:.4f} (15 bins) on {total:,} images")


def test_evaluate_images_top3(e2e, cifar, tmp_path):
    _, _, test_x, test_y = cifar
    big = tmp_path / "plane_100x80.png"
    Image.fromarray(test_x[3]).resize((100, 80), Image.BILINEAR).save(big)
    small = tmp_path / "cifar_32.jpg"
    Image.fromarray(test_x[0]).save(small, quality=95)
    best_path = e2e.run_dir / BEST_NAMES["sample_resnet"]
    proc = ok(run_script("evaluate.py", best_path, "--images", big, small, cwd=tmp_path))
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 2, proc.stdout
    ckpt = load(best_path)
    model, _ = build_model(ckpt["model"]["name"], weights="none", stride_in_1x1=ckpt["model"]["stride_in_1x1"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    # evaluation's preprocessing: shorter side to the checkpoint's image size, ToTensor, Normalize
    transform = T.Compose([T.Resize(ckpt["image_size"]), T.ToTensor(), T.Normalize(data.MEAN, data.STD)])
    for line, path in zip(lines, [big, small]):
        assert line.startswith(f"{path}: "), line
        preds = re.findall(r"(\w+) ([01]\.\d+)", line[len(str(path)) + 2:])
        assert len(preds) == 3, line
        names, probs = [p[0] for p in preds], [float(p[1]) for p in preds]
        assert set(names) <= set(data.CLASSES) and len(set(names)) == 3
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1.5e-3 and probs[-1] >= 0
        with torch.inference_mode(), Image.open(path) as img:
            p = model(transform(img.convert("RGB"))[None]).softmax(1)[0]
        top = p.topk(3)
        assert names == [data.CLASSES[i] for i in top.indices.tolist()], (line, top)
        assert np.allclose(probs, top.values.tolist(), atol=1.5e-3), (line, top)


# ----------------------------------------------------------------------------------------------
# --dry-run: parameter counts, no data, no files


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_dry_run_counts(name, tmp_path):
    assert set(MODELS) == set(MODEL_NAMES)
    empty = tmp_path / "no-data"
    empty.mkdir()
    proc = ok(run_script("train.py", "--model", name, "--weights", "none", "--dry-run", cwd=tmp_path,
                         env={"CIFAR10_ROOT": str(empty)}))
    got = re.findall(r"^Number of parameters: (\d+)\nTotal parameters: (\d+)$", proc.stdout, re.M)
    assert len(got) == 1, proc.stdout
    trainable, total = map(int, got[0])
    model, _ = build_model(name, weights="none")
    params = list(model.parameters())
    assert (trainable, total) == (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
    assert (trainable, total) == count_parameters(model)
    # independent of the project: torchvision's ResNet-50 without its 1000-way fc
    tv = torchvision.models.resnet50()
    backbone = sum(p.numel() for p in tv.parameters()) - tv.fc.weight.numel() - tv.fc.bias.numel()
    fc = 2048 * 10 + 10
    if name == "resnet":
        assert (trainable, total) == (20_490, backbone + fc) == (fc, backbone + 20_490)
    elif name == "resnet_scratch":
        assert trainable == total == backbone + fc
    elif name == "resnet_att":
        assert total - trainable == backbone
    elif name == "resnet_att_scratch":
        assert trainable == total > backbone + fc
    else:
        assert trainable == total < 1_000_000
    assert sorted(os.listdir(tmp_path)) == ["no-data"] and not os.listdir(empty)  # wrote nothing, read nothing


# ----------------------------------------------------------------------------------------------
# every model, one tiny epoch end to end


@pytest.mark.parametrize("name", [
    "sample_resnet", "resnet",
    pytest.param("resnet_scratch", marks=pytest.mark.slow),
    pytest.param("resnet_att", marks=pytest.mark.slow),
    pytest.param("resnet_att_scratch", marks=pytest.mark.slow),
])
def test_every_model_one_tiny_epoch(name, tmp_path, cifar_root):
    proc = ok(train(tmp_path, "--model", name, "--weights", "none", "--run-name", "tiny", *TINY,
                    env={"CIFAR10_ROOT": cifar_root}))
    assert [ln.split(" ")[0] for ln in seed_lines(proc.stdout)] == ["epoch:", "Train", "Val", "best", "Test"]
    assert 0 <= float(printed_test_acc(proc.stdout)) <= 1
    _, rows = read_csv(tmp_path / "log" / "tiny.csv")
    assert len(rows) == 1
    assert_real_png(tmp_path / "log" / "tiny.png")
    assert_real_png(tmp_path / "log" / "tiny-confusion.png")  # the test set's, beside the curves
    # its title (drawn, and kept as the PNG's Title text) names the run and the printed accuracy
    assert Image.open(tmp_path / "log" / "tiny-confusion.png").text["Title"] == (
        f"tiny ({name}, best checkpoint):\ntest accuracy {printed_test_acc(proc.stdout)} on 10 images")  # TINY's
    ckpt = load(tmp_path / "ck" / "tiny" / BEST_NAMES[name])
    assert ckpt["model"]["name"] == name and ckpt["epoch"] == 1 and ckpt["image_size"] == 32
    rebuilt, _ = build_model(name, weights="none", stride_in_1x1=ckpt["model"]["stride_in_1x1"])
    rebuilt.load_state_dict(ckpt["state_dict"])  # strict: the same network
    assert load(tmp_path / "ck" / "tiny" / "last.pth")["epoch"] == 1


def test_frozen_resnet_with_weights_file_trains_only_its_head(tmp_path, cifar_root, weights_path):
    proc = ok(train(tmp_path, "--model", "resnet", "--weights", weights_path, "--run-name", "w", *TINY,
                    env={"CIFAR10_ROOT": cifar_root}))
    assert 0 <= float(printed_test_acc(proc.stdout)) <= 1
    ckpt = load(tmp_path / "ck" / "w" / "ResNet.pth")
    src = load(weights_path)
    meta = src.get("meta", {}) if "state_dict" in src else {}
    src = src.get("state_dict", src)
    # the layout recorded is the file's, so evaluate.py rebuilds it without the file
    assert ckpt["model"]["stride_in_1x1"] == bool(meta.get("stride_in_1x1", False))
    state = ckpt["state_dict"]
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    assert backbone.keys() == {k for k in src if not k.startswith("fc.")}
    assert_same_tensors(backbone, {k: src[k] for k in backbone}, "frozen backbone vs the weights file")
    head = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    assert sum(v.numel() for v in head.values()) == 20_490


# ----------------------------------------------------------------------------------------------
# resume


RESUME = ["--model", "sample_resnet", "--image-size", "32", "--epochs", "2", "--train-subset", "512",
          "--batch-size", "64", "--val-split", "100", "--test-subset", "200", "--val-every", "1"]
SAME_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, cifar_root):
    """A run stopped after epoch 1 and resumed, and the same run uninterrupted."""
    tmp = tmp_path_factory.mktemp("resume")
    env = {"CIFAR10_ROOT": cifar_root}
    stopped = ok(train(tmp, *RESUME, "--run-name", "split", "--stop-after", "1", env=env))
    after_one = load(tmp / "ck" / "split" / "last.pth")
    resumed = ok(run_script("train.py", "--resume", tmp / "ck" / "split" / "last.pth", cwd=tmp, env=env))
    full = ok(train(tmp, *RESUME, "--run-name", "full", env=env))
    return SimpleNamespace(tmp=tmp, stopped=stopped, after_one=after_one, resumed=resumed, full=full)


def test_resume_after_epoch_is_bit_identical(resumed):
    tmp = resumed.tmp
    assert "Test Acc" not in resumed.stopped.stdout and "--resume" in resumed.stopped.stdout
    assert (resumed.after_one["epoch"], resumed.after_one["step"]) == (1, 0)
    for name in ("last.pth", "Sample_ResNet.pth"):
        a, b = load(tmp / "ck" / "split" / name), load(tmp / "ck" / "full" / name)
        assert a["epoch"] == b["epoch"] and a["best_val_acc"] == b["best_val_acc"]
        assert_same_tensors(a["state_dict"], b["state_dict"], f"{name}: resumed vs uninterrupted")
        assert_same_tensors(optimizer_tensors(a["optimizer"]), optimizer_tensors(b["optimizer"]), f"{name} optimizer")
        assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    assert printed_test_acc(resumed.resumed.stdout) == printed_test_acc(resumed.full.stdout)
    # the log and CSV of the resumed run hold both epochs, with the uninterrupted run's numbers
    _, split_rows = read_csv(tmp / "log" / "split.csv")
    _, full_rows = read_csv(tmp / "log" / "full.csv")
    assert [[r[c] for c in SAME_COLUMNS] for r in split_rows] == [[r[c] for c in SAME_COLUMNS] for r in full_rows]
    assert len(split_rows) == 2
    with open(tmp / "log" / "split.log") as f:
        split_log = seed_lines(f.read())
    with open(tmp / "log" / "full.log") as f:
        full_log = seed_lines(f.read())
    assert split_log == full_log and "epoch: 2" in split_log


def test_resume_with_another_model_fails_in_one_line(resumed):
    last = resumed.tmp / "ck" / "split" / "last.pth"
    before = last.read_bytes()
    proc = run_script("train.py", "--resume", last, "--model", "resnet", cwd=resumed.tmp)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    assert "model" in err and "resnet" in err
    assert last.read_bytes() == before


MID = ["--model", "sample_resnet", "--image-size", "32", "--epochs", "2", "--train-subset", "512",
       "--batch-size", "32", "--val-split", "100", "--test-subset", "100", "--val-every", "1"]


@pytest.mark.slow
def test_sigint_mid_epoch_then_resume_is_bit_identical(tmp_path, cifar_root):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--out", str(tmp_path / "ck"),
           "--log-dir", str(tmp_path / "log"), *MID, "--run-name", "cut"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=child_env({"CIFAR10_ROOT": cifar_root}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("  epoch 1/2 step"):
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(seen) + out
    assert proc.returncode == 128 + signal.SIGINT == 130, (out[-2000:], err[-2000:])
    command = re.findall(r"Resume with: python train\.py --resume (\S+)", out)
    assert len(command) == 1, out[-2000:]
    cut = load(command[0])
    assert cut["step"] > 0, (cut["epoch"], cut["step"])  # mid-epoch (16 steps an epoch; SIGINT after step 1)
    assert "Test Acc" not in out
    resumed = ok(run_script("train.py", "--resume", command[0], cwd=tmp_path, env={"CIFAR10_ROOT": cifar_root}))
    assert f"epoch: {cut['epoch'] + 1}" in resumed.stdout  # it finishes the interrupted epoch
    full = ok(train(tmp_path, *MID, "--run-name", "full", env={"CIFAR10_ROOT": cifar_root}))
    a, b = load(tmp_path / "ck" / "cut" / "last.pth"), load(tmp_path / "ck" / "full" / "last.pth")
    assert_same_tensors(a["state_dict"], b["state_dict"], "mid-epoch resume vs uninterrupted")
    assert_same_tensors(optimizer_tensors(a["optimizer"]), optimizer_tensors(b["optimizer"]), "optimizer")
    assert printed_test_acc(resumed.stdout) == printed_test_acc(full.stdout)
    _, cut_rows = read_csv(tmp_path / "log" / "cut.csv")
    _, full_rows = read_csv(tmp_path / "log" / "full.csv")
    # the running loss/accuracy of the interrupted epoch survived the interruption
    assert [[r[c] for c in SAME_COLUMNS] for r in cut_rows] == [[r[c] for c in SAME_COLUMNS] for r in full_rows]


# ----------------------------------------------------------------------------------------------
# linear probe: resnet --no-augment trains the FC on cached features, exactly as on images

PROBE = ["--model", "resnet", "--weights", "none", "--no-augment", "--image-size", "32", "--epochs", "2",
         "--train-subset", "64", "--batch-size", "16", "--val-split", "10", "--test-subset", "10", "--val-every", "1"]


def test_linear_probe_equals_training_on_images(tmp_path, cifar_root):
    env = {"CIFAR10_ROOT": cifar_root}
    probe = ok(train(tmp_path, *PROBE, "--run-name", "probe", env=env))
    plain = ok(train(tmp_path, *PROBE, "--run-name", "plain", "--no-probe", env=env))
    with open(tmp_path / "log" / "probe.log") as f:
        assert "linear probe" in f.read()
    with open(tmp_path / "log" / "plain.log") as f:
        assert "linear probe" not in f.read()
    a = load(tmp_path / "ck" / "probe" / "last.pth")["state_dict"]
    b = load(tmp_path / "ck" / "plain" / "last.pth")["state_dict"]
    assert a.keys() == b.keys()
    fc = [k for k in a if k.startswith("head.fc.")]
    assert fc
    for k in fc:
        assert (a[k] - b[k]).abs().max() <= 1e-5, k  # measured: 0.0 (bit-identical)
    assert_same_tensors({k: a[k] for k in a if k not in fc}, {k: b[k] for k in b if k not in fc}, "frozen backbone")
    assert len(seed_lines(probe.stdout)) == len(seed_lines(plain.stdout)) == 9
    _, probe_rows = read_csv(tmp_path / "log" / "probe.csv")
    _, plain_rows = read_csv(tmp_path / "log" / "plain.csv")
    for r, s in zip(probe_rows, plain_rows):
        for c in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert abs(float(r[c]) - float(s[c])) < 1e-4, (c, r, s)
    assert float(probe_rows[1]["train_loss"]) < float(probe_rows[0]["train_loss"])  # the FC did learn


# ----------------------------------------------------------------------------------------------
# Issue 33: model selection when validation does not rise every epoch

SCRIPTED_VALIDATION = """
import sys
sys.path.insert(0, {root!r})
import train
real, accs = train.validate, iter({accs!r})
def scripted(net, loader, rt, stop, keep_predictions=False):
    result = real(net, loader, rt, stop, keep_predictions)
    if keep_predictions:  # the final test: as it is
        return result
    loss, _, confusion = result
    return loss, next(accs), confusion
train.validate = scripted
sys.exit(train.main(sys.argv[1:]))
"""


def test_the_best_epoch_not_the_last_is_kept_and_tested(tmp_path, cifar_root):
    """Validation accuracy 0.5, then 0.3, then 0.5 again (a tie keeps the first): the best
    checkpoint is epoch 1's, last.pth epoch 3's, and the final test runs on epoch 1's weights."""
    import checkpoints as ck
    import report
    driver = tmp_path / "driver.py"
    driver.write_text(SCRIPTED_VALIDATION.format(root=ROOT, accs=[0.5, 0.3, 0.5]))
    proc = ok(run_script(driver, "--out", tmp_path / "ck", "--log-dir", tmp_path / "log", "--run-name", "r",
                         "--model", "sample_resnet", "--image-size", "32", "--epochs", "3", "--val-every", "1",
                         "--train-subset", "64", "--batch-size", "32", "--val-split", "100", "--test-subset", "100",
                         "--no-download", cwd=tmp_path, env={"CIFAR10_ROOT": cifar_root}))
    best, last = load(tmp_path / "ck" / "r" / BEST_NAMES["sample_resnet"]), load(tmp_path / "ck" / "r" / "last.pth")
    assert (best["epoch"], best["best_val_acc"], last["epoch"]) == (1, 0.5, 3)
    assert "best checkpoint: epoch 1, val acc 0.5000" in proc.stdout
    assert any(not torch.equal(best["state_dict"][k], last["state_dict"][k]) for k in best["state_dict"])
    pred = report.read_predictions(tmp_path / "log" / "r-test.npz")
    assert pred["meta"]["epoch"] == 1
    model, _ = ck.load_model(str(tmp_path / "ck" / "r" / BEST_NAMES["sample_resnet"]))
    loader = data.get_loaders(cifar_root, 32, 32, "cpu", val_split=100, test_subset=100, train_subset=64,
                              download=False)["test"]
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in loader])
    assert np.array_equal(logits.argmax(1).numpy(), pred["predicted"])  # the best weights' predictions


def test_val_every_validates_those_epochs_and_the_last(tmp_path, cifar_root):
    """Issue 33: --val-every 2 over 5 epochs validates after epochs 2, 4 and 5 (the last always),
    and the best checkpoint is chosen among those."""
    ok(train(tmp_path, "--run-name", "v", "--model", "sample_resnet", "--image-size", "32", "--epochs", "5",
             "--val-every", "2", "--train-subset", "32", "--batch-size", "32", "--val-split", "100",
             "--test-subset", "10", "--no-download", env={"CIFAR10_ROOT": cifar_root}))
    _, rows = read_csv(tmp_path / "log" / "v.csv")
    assert [r["epoch"] for r in rows if r["val_acc"]] == ["2", "4", "5"]
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert load(tmp_path / "ck" / "v" / BEST_NAMES["sample_resnet"])["epoch"] in (2, 4, 5)


def test_compiled_run_stops_resumes_exactly_and_evaluates(tmp_path, cifar_root):
    """Issue 33: --compile (the sample_resnet row's setting). Its checkpoints hold the plain
    model's keys (no torch.compile "_orig_mod." prefix), it resumes where it stopped, ends with the
    uninterrupted compiled run's weights, and evaluate.py rebuilds it. (~1 min: the first process
    compiles; the other two reuse Inductor's cache.)"""
    from test_faults import assert_resumed_at, assert_same_weights
    run = ["--model", "sample_resnet", "--image-size", "32", "--epochs", "2", "--val-every", "1", "--train-subset",
           "64", "--batch-size", "32", "--val-split", "100", "--test-subset", "50", "--no-download", "--compile"]
    env = {"CIFAR10_ROOT": cifar_root}
    ok(train(tmp_path, *run, "--run-name", "cut", "--stop-after", "1", env=env))
    cut = load(tmp_path / "ck" / "cut" / "last.pth")
    assert cut["args"]["compile"] is True and (cut["epoch"], cut["step"]) == (1, 0)
    assert not [k for k in cut["state_dict"] if "_orig_mod" in k or k.startswith("module.")]
    resumed = ok(run_script("train.py", "--resume", tmp_path / "ck" / "cut" / "last.pth", cwd=tmp_path, env=env))
    assert_resumed_at(resumed.stdout, cut)
    full = ok(train(tmp_path, *run, "--run-name", "full", env=env))
    assert_same_weights(tmp_path / "ck" / "cut" / "last.pth", tmp_path / "ck" / "full" / "last.pth")
    assert printed_test_acc(resumed.stdout) == printed_test_acc(full.stdout)
    evaluated = ok(run_script("evaluate.py", tmp_path / "ck" / "cut" / BEST_NAMES["sample_resnet"], "--no-download",
                              cwd=tmp_path, env=env))
    assert printed_test_acc(evaluated.stdout) == printed_test_acc(full.stdout)
