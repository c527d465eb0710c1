"""explain.py (Grad-CAM, CBAM attention maps) and compare.py (runs side by side)."""
import os
import re
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import compare
import explain
import report
from attention_model import ChannelAttention, SampleResNet, SpatialAttention
from conftest import run_script
from models import build_model
from utils import run_cli


# ----------------------------------------------------------------------------------------------
# Grad-CAM


class QuadrantNet(nn.Module):
    """Class 0 reads only the top-left quadrant of the input, class 1 only the bottom-right one; the
    feature map (``trunk``'s output, 8x8) is active in both quadrants."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.trunk = nn.Sequential(nn.ReLU(), nn.AvgPool2d(4))
        self.fc = nn.Linear(8, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0] * 4 + [0.0] * 4, [0.0] * 4 + [1.0] * 4]))

    def forward(self, x):
        half = x.shape[-1] // 2
        tl, br = torch.zeros_like(x), torch.zeros_like(x)
        tl[..., :half, :half], br[..., half:, half:] = x[..., :half, :half], x[..., half:, half:]
        a = self.trunk(torch.cat([self.conv(tl), self.conv(br)], dim=1))  # (B, 8, 8, 8)
        return self.fc(a.mean(dim=(2, 3)))


def test_gradcam_finds_the_quadrant_the_class_reads():
    torch.manual_seed(0)
    net = QuadrantNet().eval()
    x = torch.randn(3, 3, 32, 32)
    for cls, (rows, cols) in ((0, (slice(0, 4), slice(0, 4))), (1, (slice(4, 8), slice(4, 8)))):
        cam = explain.gradcam(net, x, cls, layer=net.trunk)
        assert cam.shape == (3, 8, 8) and cam.min() >= 0 and cam.amax(dim=(1, 2)).eq(1).all()
        inside = cam[:, rows, cols].sum(dim=(1, 2)) / cam.sum(dim=(1, 2))
        assert (inside >= 0.9).all(), inside


def reference_gradcam(model, x, cls, layer):
    """Textbook Grad-CAM: backward through the whole network, gradient retained on the layer's output."""
    saved = {}

    def keep(module, inputs, output):
        output.retain_grad()
        saved["a"] = output

    handle = layer.register_forward_hook(keep)
    model(x).gather(1, cls[:, None]).sum().backward()
    handle.remove()
    a = saved["a"]
    cam = F.relu((a.grad.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1)).detach()
    return (cam / cam.amax(dim=(1, 2), keepdim=True)).nan_to_num(0.0)  # 0/0: a map that is 0 everywhere


@pytest.mark.parametrize("name", ["sample_resnet", "resnet"])
def test_gradcam_equals_textbook_also_for_a_frozen_backbone(name):
    torch.manual_seed(0)
    model, _ = build_model(name, weights="none")
    model.eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        cls = model(x).argmax(dim=1)
    layer = explain.target_layer(model)
    if name == "resnet":  # layer4 runs without autograd: the hook must make its gradient exist
        assert model.frozen and layer is model.backbone.layer4
    cam = explain.gradcam(model, x, cls)
    assert cam.amax(dim=(1, 2)).eq(1).sum() >= 2  # not all maps are zero
    if name == "resnet":  # the same network, trained end to end: every layer through autograd
        model.frozen = False
        model.backbone.requires_grad_(True)
    torch.testing.assert_close(cam, reference_gradcam(model, x, cls, layer), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# The attention maps


def test_hooks_give_what_each_block_multiplies_by():
    torch.manual_seed(0)
    model = SampleResNet().eval()
    assert not [k for k in model.state_dict() if "gate" in k]  # the gates hold no parameters
    seen = {}
    for m in model.modules():
        if isinstance(m, (ChannelAttention, SpatialAttention)):
            m.register_forward_hook(lambda mod, inp, out: seen.setdefault(mod, (inp[0], out)) and None)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), explain.AttentionRecorder(model) as rec:
        model(x)
    blocks = explain.cbam_blocks(model)
    assert [b["label"] for b in rec.maps] == ["features.4 (ResAttention)", "features.5 (AttentionModule)",
                                              "features.6 (ResAttention)"]
    for record, (_, cbam) in zip(rec.maps, blocks):
        ms, mc = record["Ms"], record["Mc"]
        f_in, f_out = seen[cbam[1]]
        assert ms.shape == (2, 1) + f_in.shape[-2:] == (2, 1, 8, 8)
        assert mc.shape == (2, 78, 1, 1)
        assert ((ms > 0) & (ms < 1)).all() and ((mc > 0) & (mc < 1)).all()
        assert torch.equal(f_out, f_in * ms)
        c_in, c_out = seen[cbam[0]]
        assert torch.equal(c_out, c_in * mc)
    assert not any(cbam[k].gate._forward_hooks for _, cbam in blocks for k in (0, 1))  # removed on exit


def test_resnet_att_has_one_cbam_block_at_the_feature_map_size():
    model, _ = build_model("resnet_att", weights="none")
    model.eval()
    with torch.no_grad(), explain.AttentionRecorder(model) as rec:
        model(torch.randn(1, 3, 128, 128))
    assert [(r["label"], tuple(r["Ms"].shape), tuple(r["Mc"].shape)) for r in rec.maps] == [
        ("head.body.3 (ResAttention)", (1, 1, 4, 4), (1, 480, 1, 1))]
    assert explain.cbam_blocks(build_model("resnet", weights="none")[0]) == []


# ----------------------------------------------------------------------------------------------
# The commands, end to end


TINY = ["--model", "sample_resnet", "--image-size", "32", "--epochs", "1", "--train-subset", "64",
        "--batch-size", "16", "--val-split", "100", "--test-subset", "64", "--val-every", "1",
        "--out", "ck", "--log-dir", "log", "--no-download"]


@pytest.fixture(scope="module")
def two_runs(cifar_root, tmp_path_factory):
    """Two tiny train.py runs (relative --out/--log-dir, as a user runs it): {name: printed test acc}."""
    folder = tmp_path_factory.mktemp("runs")
    accs = {}
    for name, seed in (("a", "0"), ("b", "1")):
        r = run_script("train.py", *TINY, "--run-name", name, "--seed", seed, cwd=folder,
                       env={"CIFAR10_ROOT": cifar_root})
        assert r.returncode == 0, r.stdout + r.stderr
        accs[name] = re.search(r"^Test Acc : ([\d.]+)$", r.stdout, re.M).group(1)
    return folder, accs


def colours(path):
    with Image.open(path) as img:
        return len(img.convert("RGB").getcolors(maxcolors=1 << 24))


def test_explain_draws_a_checkpoint(two_runs, cifar_root, tmp_path):
    folder, _ = two_runs
    out = tmp_path / "maps.png"
    r = run_script("explain.py", folder / "ck" / "a" / "Sample_ResNet.pth", "--test", "3", "--seed", "1",
                   "--out", out, "--no-download", env={"CIFAR10_ROOT": cifar_root})
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(re.findall(r"^test #\d+ \(true \w+\): predicted \w+ [\d.]+$", r.stdout, re.M)) == 3
    assert out.stat().st_size > 10_000 and colours(out) > 1000


def test_figure_title_names_the_run_and_file_not_the_whole_path():
    info = {"name": "ResNet_scratch", "epoch": 2, "image_size": 224}
    path = os.path.join("/root", "runs", "seed-cpu", "checkpoints", "seed-cpu-resnet_scratch-seed0", "ResNet_scratch.pth")
    title = explain.figure_title(path, info, has_cbam=False)
    assert title.splitlines() == [
        "ResNet_scratch:",
        f"{os.path.join('seed-cpu-resnet_scratch-seed0', 'ResNet_scratch.pth')} (epoch 2, 224 px)",
        "no CBAM blocks: Grad-CAM only"]
    assert explain.figure_title("Sample_ResNet.pth", info, has_cbam=True) == \
        "ResNet_scratch:\nSample_ResNet.pth (epoch 2, 224 px)"


def test_compare_tables_two_runs(two_runs, tmp_path, monkeypatch, capsys):
    """In this process (a second interpreter costs more than the whole comparison); from another
    folder: the logs name their checkpoints relative to where train.py ran."""
    folder, accs = two_runs
    out = tmp_path / "runs.png"
    monkeypatch.chdir(tmp_path)
    assert compare.main([str(folder / "log" / "a.csv"), str(folder / "log" / "b.csv"), "--out", str(out)]) == 0
    stdout, stderr = capsys.readouterr()
    # seeds 0 and 1 draw other test subsets: no paired test, one line saying why (issue 32)
    assert [ln.split(": ", 1)[1] for ln in stderr.splitlines()] == [
        "a vs b: no paired test, they were not tested on the same images (other test images (subsets of 64 drawn "
        "with other seeds))"]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in stdout.splitlines()
            if line.startswith("| a ") or line.startswith("| b ")}
    assert sorted(rows) == ["a", "b"]
    for name, cells in rows.items():
        # run, model, train acc, best val, test acc, its interval, params, epochs, size, train images, time, img/s
        assert cells[1] == "sample_resnet" and cells[4] == accs[name], cells
        assert cells[5].endswith("images)") and cells[6:10] == ["234,226", "1", "32", "64"], cells
    assert out.stat().st_size > 10_000 and colours(out) > 50


def test_compare_shows_a_run_in_progress(two_runs, tmp_path, capsys):
    folder, _ = two_runs
    shutil.copy(folder / "log" / "a.csv", tmp_path / "going.csv")
    log = (folder / "log" / "a.log").read_text()
    cut = log.replace("checkpoints: ck/a/", "checkpoints: gone/a/").split("best checkpoint:")[0]
    (tmp_path / "going.log").write_text(cut)
    assert compare.main([str(tmp_path / "going.csv")]) == 0
    out, err = capsys.readouterr()
    cells = [line for line in out.splitlines() if line.startswith("| going ")][0].split(" | ")
    assert cells[4] == "running" and cells[9] == "64"  # its training images from the log's "data:" line
    assert "no 'Test Acc' line" in err and "no checkpoint" not in err
    # a log older than the "data:" line: the checkpoint would say it, and it is gone
    (tmp_path / "going.log").write_text("".join(ln for ln in cut.splitlines(True) if not ln.startswith("data: ")))
    assert compare.main([str(tmp_path / "going.csv")]) == 0
    out, err = capsys.readouterr()
    cells = [line for line in out.splitlines() if line.startswith("| going ")][0].split(" | ")
    assert cells[9] == compare.MISSING and "no checkpoint in gone/a/" in err


def test_the_log_says_the_training_images():
    """report.parse_log's training images: the first line that says them, train.py's "data:" line or a frozen run's cache lines."""
    data = "data: cifar10, 10 classes, 45,000 train / 5,000 val / 10,000 test images\n"
    cached = "train: 44,000 images' maps features from the cache /c/train-224px\n"
    computed = ("computing the frozen backbone's maps and pooled features of the 43,000 train images at 224 px "
                "(352 of 352 chunks to go) into /c/x\n")
    assert report.parse_log(data + cached)["train_images"] == 45000
    assert report.parse_log(cached + data)["train_images"] == 44000
    assert report.parse_log(computed)["train_images"] == 43000
    assert "train_images" not in report.parse_log(cached.replace("train:", "val:") + "data: cifar10, 10 classes\n")


# ----------------------------------------------------------------------------------------------
# Bad inputs: one line on stderr, non-zero exit


def one_line_error(capsys, main, argv):
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(argv))
    out, err = capsys.readouterr()
    assert e.value.code != 0 and err.count("\n") == 1 and "error:" in err, err
    return err


def test_bad_inputs(tmp_path, capsys):
    noise = tmp_path / "noise.bin"
    noise.write_bytes(os.urandom(3000))
    weights = tmp_path / "weights.pth"
    torch.save(SampleResNet().state_dict(), weights)  # a PyTorch file, not a checkpoint of ours
    other_csv = tmp_path / "other.csv"
    other_csv.write_text("step,loss\n1,0.5\n")
    ex = lambda *argv: one_line_error(capsys, explain.main, [*map(str, argv), "--out", str(tmp_path / "x.png")])
    assert "does not exist" in ex(tmp_path / "missing.pth")
    assert "not a PyTorch file" in ex(noise)
    assert "not a checkpoint of this project" in ex(weights)
    cmp = lambda *argv: one_line_error(capsys, compare.main, list(map(str, argv)))
    assert "does not exist" in cmp(tmp_path / "missing.csv")
    assert "not a train.py CSV" in cmp(noise)
    assert "not a train.py CSV" in cmp(other_csv)
    assert "PNG" in cmp(other_csv, "--out", tmp_path / "x.jpg")
    assert not (tmp_path / "x.png").exists()


def test_explain_refuses_a_file_that_is_not_an_image(two_runs, tmp_path, capsys):
    folder, _ = two_runs
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    err = one_line_error(capsys, explain.main, [str(folder / "ck" / "a" / "last.pth"), "--images", str(text),
                                                "--out", str(tmp_path / "x.png")])
    assert "is not an image" in err and not (tmp_path / "x.png").exists()
