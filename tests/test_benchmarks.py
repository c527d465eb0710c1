"""benchmarks/: bench.py's rows and JSON, reproduce.py's table, gpu_check.py's CPU rehearsal, and the
partial data folder (CIFAR10_PARTIAL) that gpu_check trains on."""
import json
import os
import shutil
import sys
import tarfile
import time

import pytest

import report
from conftest import ROOT, run_script

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

MODELS = ["sample_resnet", "resnet", "resnet_att", "resnet_scratch", "resnet_att_scratch"]
TINY_BENCH = ["--image-size", "32", "--batch-size", "8", "--steps", "1", "--min-seconds", "0"]


def partial_folder(tmp_path, cifar_root):
    """A cifar-10-batches-bin holding only data_batch_1.bin and test_batch.bin, as on the GPU."""
    src = os.path.join(cifar_root, "cifar-10-batches-bin")
    dst = tmp_path / "partial" / "cifar-10-batches-bin"
    dst.mkdir(parents=True)
    for name in ("data_batch_1.bin", "test_batch.bin"):
        os.symlink(os.path.join(src, name), dst / name)
    return str(tmp_path / "partial")


# ----------------------------------------------------------------------------------------------
# bench.py


def test_bench_writes_rows_with_ratios(tmp_path):
    out = tmp_path / "bench.json"
    r = run_script("benchmarks/bench.py", *TINY_BENCH, "--workers", "1", "--models", "sample_resnet",
                   "--json", out, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(out.read_text())
    assert [(row["kind"], row["model"]) for row in result["rows"]] == [
        ("data", None), ("train", "sample_resnet"), ("eval", "sample_resnet")]
    for row in result["rows"]:
        assert row["project_img_s"] > 0 and row["seed_img_s"] > 0
        assert row["ratio"] == pytest.approx(row["project"]["img_s"] / row["seed"]["img_s"], abs=0.01)
        assert row["image_size"] == 32 and row["batch_size"] == 8
    assert {"cpu", "cores", "gpu", "torch"} <= result["machine"].keys()
    assert result["machine"]["cores"] >= 1 and result["command"].startswith("python benchmarks/bench.py")
    assert "| data | - | 32 | 8 |" in r.stdout and "| train | sample_resnet |" in r.stdout


def test_bench_records_a_failed_row_and_goes_on(tmp_path):
    out = tmp_path / "bench.json"  # -1 workers: the seed's DataLoader refuses; the project's side stands
    r = run_script("benchmarks/bench.py", *TINY_BENCH, "--workers", "-1", "--skip-train", "--json", out, timeout=60)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["kind"] == "data" and "num_workers" in row["seed"]["error"] and row["ratio"] is None
    assert row["project_img_s"] > 0 and "| data | - | 32 | 8 | " in r.stdout and "num_workers" in r.stdout


# ----------------------------------------------------------------------------------------------
# reproduce.py


def fake_run(tmp_path, model, test_acc):
    """A run's CSV written by train.py's own writer, and its output lines, as train.py prints them."""
    csv_path = str(tmp_path / f"{model}.csv")
    for epoch, val in ((1, ""), (2, "0.51000")):
        report.append_csv(csv_path, {"epoch": epoch, "train_loss": "1.0", "train_acc": f"0.{epoch}0000",
                                    "val_loss": "1.1" if val else "", "val_acc": val, "lr": "0.1",
                                    "seconds": "10.0", "images_per_s": f"{100 * epoch}.0"})
    output = (f"run x: {model}, 20,490 trainable of 23,528,522 parameters, cpu fp32, image size 32, batch 128, "
              f"sgd lr 0.1, 2 epochs\n"
              f"best accuracy is 0.5100\nTest loss : 1.2000\nTest Acc : {test_acc:.4f}\n")
    return csv_path, output


def test_reproduce_reads_runs_into_a_five_row_table(tmp_path):
    import reproduce
    rows = []
    for model in MODELS:
        figures = report.read_run(*fake_run(tmp_path, model, 0.5))
        rows.append({"model": model, "settings": reproduce.PRESETS["cpu"][model], "returncode": 0,
                     "wall_s": 60.0, "seed_test_acc": reproduce.SEED_TEST_ACC[model], **figures})
    assert figures == {"epochs_done": 2, "train_acc": 0.2, "best_val_acc": 0.51, "test_acc": 0.5,
                       "train_img_s": 150.0, "train_s": 20.0, "trainable_params": 20490, "total_params": 23528522}
    meta = {"preset": "cpu", "command": "python benchmarks/reproduce.py --preset cpu", "weights": "w.pth",
            "machine": {"cpu": "CPU X", "cores": 2, "gpu": None, "torch": "2"}, "date": "today", "train_pool": 50000}
    table = reproduce.markdown(rows, meta)
    body = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| model")]
    assert [ln.split(" | ")[0][2:] for ln in body] == MODELS
    assert "| 0.9631 |" in body[-1] and "32 px" in body[0] and "python benchmarks/reproduce.py" in table


def test_reproduce_seeds_give_mean_and_std(tmp_path):
    import reproduce
    rows = []
    for seed, acc in ((0, 0.5), (1, 0.6), (2, 0.7)):
        figures = report.read_run(*fake_run(tmp_path / str(seed), "resnet", acc)) if (tmp_path / str(seed)).mkdir() \
            is None else None
        rows.append({"model": "resnet", "settings": dict(reproduce.PRESETS["cpu"]["resnet"], seed=seed),
                     "returncode": 0, "wall_s": 60.0, "seed_test_acc": 0.8443, **figures})
    meta = {"preset": "cpu", "command": "c", "weights": "w", "machine": {"cpu": "X", "cores": 2, "gpu": None,
                                                                         "torch": "2"}, "date": "d", "train_pool": 50000}
    body = [ln for ln in reproduce.markdown(rows, meta).splitlines() if ln.startswith("| resnet")]
    assert len(body) == 1  # one row for the three seeds
    assert "0.6000 ± 0.1000 (3)" in body[0] and "seeds 0, 1, 2" in body[0] and "3.0 min" in body[0]


def test_reproduce_presets_cover_the_five_models():
    import reproduce
    for preset in ("full", "cpu", "tiny", "seed-cpu"):
        assert list(reproduce.PRESETS[preset]) == MODELS
    seed_cpu = reproduce.PRESETS["seed-cpu"]  # the seed's scale: 224 px, all training images, the full test set
    assert all(o["image_size"] == 224 and not {"train_subset", "test_subset", "val_split"} & o.keys()
               for o in seed_cpu.values())
    assert seed_cpu["sample_resnet"]["epochs"] == 10 and seed_cpu["resnet_scratch"]["epochs"] == 2
    assert all(o == {"image_size": 224, "epochs": 10, "val_every": 5} for o in reproduce.PRESETS["full"].values())


def test_reproduce_tiny_one_model(tmp_path, cifar_root):
    r = run_script("benchmarks/reproduce.py", "--tiny", "--models", "sample_resnet", "--data-dir", cifar_root,
                   "--out", tmp_path, "--log-dir", tmp_path / "log", "--checkpoints", tmp_path / "ck", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    (md,) = [p for p in os.listdir(tmp_path) if p.startswith("tiny") and p.endswith(".md")]
    result = json.loads((tmp_path / md.replace(".md", ".json")).read_text())
    (row,) = result["rows"]
    assert row["model"] == "sample_resnet" and row["epochs_done"] == 1 and 0 <= row["test_acc"] <= 1
    assert row["trainable_params"] == 234226 and row["command"].startswith("python train.py --model sample_resnet")
    assert "| sample_resnet | done | 32 px, 1 ep, train 64" in (tmp_path / md).read_text()


@pytest.mark.slow
def test_reproduce_tiny_five_models(tmp_path, cifar_root, weights_path):
    r = run_script("benchmarks/reproduce.py", "--tiny", "--data-dir", cifar_root, "--weights", weights_path,
                   "--out", tmp_path, "--log-dir", tmp_path / "log", "--checkpoints", tmp_path / "ck", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (js,) = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    rows = json.loads((tmp_path / js).read_text())["rows"]
    assert [row["model"] for row in rows] == MODELS
    assert all(row["test_acc"] is not None and row["returncode"] == 0 for row in rows)


# ----------------------------------------------------------------------------------------------
# The partial data folder and gpu_check.py


def test_partial_folder_needs_the_opt_in(tmp_path, cifar_root, monkeypatch):
    import data
    from utils import UserError
    root = partial_folder(tmp_path, cifar_root)
    monkeypatch.delenv("CIFAR10_PARTIAL", raising=False)
    with pytest.raises(UserError, match="lacks data_batch_2.bin.*CIFAR10_PARTIAL=1"):
        data.load_cifar10(root, download=False)
    monkeypatch.setenv("CIFAR10_PARTIAL", "1")
    train_x, train_y, test_x, _ = data.load_cifar10(root, download=False)
    assert train_x.shape == (10000, 32, 32, 3) and len(train_y) == 10000 and len(test_x) == 10000


REHEARSAL_BUDGET_S = 300


@pytest.mark.slow
def test_gpu_check_rehearsal_on_cpu(tmp_path, cifar_root):
    """The whole GPU script on the CPU at tiny sizes: the report a lent GPU would bring back, within
    its budget, as at most 8 files at the top of --out; then the CPU resumes the device's checkpoint."""
    out = tmp_path / "out"
    start = time.time()
    r = run_script("benchmarks/gpu_check.py", "--rehearse", "--budget", REHEARSAL_BUDGET_S, "--data-dir",
                   partial_folder(tmp_path, cifar_root), "--out", out, timeout=600)
    wall = time.time() - start
    files = sorted(os.listdir(out))  # a device call brings back 8 files at most, 2 folders down
    assert all(os.path.isfile(out / f) for f in files), files
    (md,) = [f for f in files if f.endswith(".md")]
    assert files == sorted(["device-last.pth", "logs.tar.gz", md, md[:-3] + ".json"]), files
    report = json.loads((out / (md[:-3] + ".json")).read_text())
    checks = {c["check"]: c for c in report["checks"]}
    assert list(checks) == ["versions", "tests", "parity", "stop", "resume", "evaluate", "torchrun", "sync", "bench",
                            "compile"]
    # every check ran and passed (compile: maybe no C++ toolchain, or no time left on a busy CPU)
    failed = {name: c["status"] for name, c in checks.items() if c["status"] != "ok" and name != "compile"}
    assert not failed, (failed, r.stdout[-3000:])
    assert checks["parity"]["max_diff"] == {m: {"train": 0.0, "eval": 0.0} for m in ("tf32_off", "tf32_on")}
    md = (out / md).read_text()
    for name in checks:  # the report names every check with its status
        assert f"| {name} | {checks[name]['status']} |" in md
    for model in MODELS:  # the throughput table names all five
        assert f"| {model} |" in md
    assert [row["model"] for row in report["rows"]] == ["resnet_att_scratch", "resnet_scratch", "sample_resnet"]
    assert all(row["status"] == "done" and row["test_acc"] is not None for row in report["rows"]), report["rows"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/check-torchrun.log" in names and "logs/gpu-sample_resnet.csv" in names
    assert wall <= REHEARSAL_BUDGET_S + 30, f"{wall:.0f} s; checks: {[(n, c['seconds']) for n, c in checks.items()]}"
    # the CPU side resumes the device's checkpoint (stopped after epoch 1 of 2) and evaluates it
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(out / "device-last.pth", resumed / "last.pth")
    res = run_script("train.py", "--resume", resumed / "last.pth", "--device", "cpu", "--data-dir", cifar_root,
                     cwd=resumed)  # the run's --out and --log-dir are relative: here
    assert res.returncode == 0 and "Test Acc" in res.stdout, res.stdout[-2000:] + res.stderr
    res = run_script("evaluate.py", out / "device-last.pth", "--data-dir", cifar_root, "--no-download",
                     "--device", "cpu", "--test-subset", "100")
    assert res.returncode == 0 and "Test Acc" in res.stdout, res.stderr


def test_bench_targets_allow_for_noise_only_near_the_target():
    import torch
    import bench
    rows = [{"kind": "data", "model": None, "image_size": 224, "ratio": 7.0, "project_img_s": 4900.0},
            {"kind": "train", "model": "resnet", "image_size": 64, "ratio": 1.2, "project_img_s": 70.0},
            {"kind": "train", "model": "resnet_scratch", "image_size": 64, "ratio": 0.97, "project_img_s": 20.0}]
    checks = list(bench.targets(rows, torch.device("cpu")).values())
    assert checks == ["met", "within noise"]
    rows[2]["ratio"] = 0.8
    assert list(bench.targets(rows, torch.device("cpu")).values()) == ["met", "NOT met"]


def test_folder_bench_prints_every_row_with_its_ratio(tmp_path, cifar_root):
    """Issue 39's benchmark, at its smallest: the caching pass, the plain DataLoader epoch, both
    tensor data paths and both training rows, each with a figure and a ratio. At 80 px the cache
    (base 80) takes the uint8 kernels, as at 224."""
    out = tmp_path / "folder.md"
    r = run_script("benchmarks/folder_bench.py", "--data-dir", cifar_root, "--images", "64", "--image-size", "80",
                   "--steps", "1", "--out", out)
    assert r.returncode == 0, r.stderr
    table = out.read_text()
    for row in ("1. caching pass", "2. plain ImageFolder", "3a. data path from the cache", "3b.", "3c.", "4a.", "4b."):
        line = next(l for l in table.splitlines() if l.startswith(f"| {row}"))
        assert float(line.split("|")[2].replace(",", "")) > 0, line
    assert "Machine: " in table and "by uint8 kernels" in table
