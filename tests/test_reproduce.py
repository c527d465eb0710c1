"""benchmarks/reproduce.py as a driver that can be stopped at any moment (issue 18): fixed run names,
finished rows never retrained, interrupted rows resumed (also after kill -9 of the driver), an
unreadable last.pth restarted, a failed row showing its run's own error, finished runs adopted.

Each case drives reproduce.py's main through a small script that shrinks the tiny preset's runs to
a few seconds (and can make them longer, so that a kill lands mid-run).
"""
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT, child_env

DRIVER = """
import sys
sys.path.insert(0, {bench!r})
import reproduce
reproduce.PRESETS["tiny"]["sample_resnet"].update({opts})
sys.exit(reproduce.main(sys.argv[1:]))
"""


def driver(tmp_path, **opts):
    path = tmp_path / f"driver{len(opts)}.py"
    path.write_text(DRIVER.format(bench=os.path.join(ROOT, "benchmarks"), opts=opts))
    return str(path)


def args(tmp_path, cifar_root, *extra):
    return ["--tiny", "--models", "sample_resnet", "--data-dir", cifar_root, "--out", str(tmp_path / "results"),
            "--log-dir", str(tmp_path / "log"), "--checkpoints", str(tmp_path / "ck"), *extra]


def reproduce(script, argv, timeout=300):
    return subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=child_env({"OMP_NUM_THREADS": "1"}))


def table(tmp_path):
    return json.loads((tmp_path / "results" / "tiny.json").read_text())


def trainings(tmp_path, name):
    """The train.py command lines a row's runs were started with (its .out file records each)."""
    out = tmp_path / "log" / f"{name}.out"
    return [ln for ln in out.read_text().splitlines() if ln.startswith("$ python train.py")] if out.exists() else []


def test_a_second_call_keeps_finished_rows_and_a_failed_row_says_why(tmp_path, cifar_root):
    script = driver(tmp_path)
    res = reproduce(script, args(tmp_path, cifar_root))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    (row,) = table(tmp_path)["rows"]
    assert row["run"] == "tiny-sample_resnet-seed0" and row["status"] == "done" and row["test_acc"] is not None
    first = (tmp_path / "log" / "tiny-sample_resnet-seed0.csv").read_text()
    res = reproduce(script, args(tmp_path, cifar_root))  # the same command again: nothing to train
    assert res.returncode == 0, res.stderr
    assert len(trainings(tmp_path, "tiny-sample_resnet-seed0")) == 1
    assert (tmp_path / "log" / "tiny-sample_resnet-seed0.csv").read_text() == first
    assert "| sample_resnet | done |" in res.stdout
    # a row that fails shows the run's own one-line error, in the table and its JSON
    res = reproduce(script, args(tmp_path, cifar_root, "--models", "resnet", "--weights", str(tmp_path / "no.pth")))
    assert res.returncode == 1
    (row,) = table(tmp_path)["rows"]
    assert row["status"] == "failed" and row["error"].startswith("train.py: error: ") and "no.pth" in row["error"]
    assert f"| resnet | failed: train.py: error: " in res.stdout


def test_kill9_of_the_driver_then_the_same_command_finishes_exactly(tmp_path, cifar_root):
    """Two rows (seeds 0, 1). The driver is killed (-9) while seed 1 trains: its train.py is told
    (SIGTERM), saves last.pth and stops. The same command then keeps seed 0 as it was and resumes
    seed 1, which ends with the weights of an uninterrupted run of it, bit for bit."""
    slow = driver(tmp_path, epochs=4, train_subset=256)  # 4 epochs of 8 steps
    argv = args(tmp_path, cifar_root, "--seeds", "0", "1")
    proc = subprocess.Popen([sys.executable, slow, *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=child_env({"OMP_NUM_THREADS": "1"}))
    last = tmp_path / "ck" / "tiny-sample_resnet-seed1" / "last.pth"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert last.exists() and proc.poll() is None, "seed 1 should be mid-run"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    lock = open(tmp_path / "log" / "tiny-sample_resnet-seed1.lock")
    fcntl.flock(lock, fcntl.LOCK_EX)  # its train.py shares the row's lock until it has exited
    lock.close()
    assert torch.load(last, weights_only=True)["epoch"] < 4, "the orphaned run should have stopped"
    seed0 = (tmp_path / "log" / "tiny-sample_resnet-seed0.csv").read_text()

    res = reproduce(slow, argv)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    assert (tmp_path / "log" / "tiny-sample_resnet-seed0.csv").read_text() == seed0  # not retrained
    assert len(trainings(tmp_path, "tiny-sample_resnet-seed0")) == 1
    runs = trainings(tmp_path, "tiny-sample_resnet-seed1")
    assert len(runs) == 2 and "--resume" in runs[1]
    rows = table(tmp_path)["rows"]
    assert [r["status"] for r in rows] == ["done", "done"] and all(r["epochs_done"] == 4 for r in rows)

    ref = tmp_path / "ref"  # seed 1 uninterrupted
    res = reproduce(slow, args(ref, cifar_root, "--seeds", "1"))
    assert res.returncode == 0, res.stderr
    a = torch.load(last, weights_only=True)["state_dict"]
    b = torch.load(ref / "ck" / "tiny-sample_resnet-seed1" / "last.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_more_epochs_than_the_presets_are_a_run_and_a_table_of_their_own(tmp_path, cifar_root):
    # e.g. the fine-tuned seed-cpu rows beyond their 2 epochs: the preset's own runs and table stay
    res = reproduce(driver(tmp_path), args(tmp_path, cifar_root, "--epochs", "2"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    assert not (tmp_path / "results" / "tiny.json").exists()
    meta = json.loads((tmp_path / "results" / "tiny-2ep.json").read_text())
    (row,) = meta["rows"]
    assert row["run"] == "tiny-2ep-sample_resnet-seed0" and row["status"] == "done" and row["epochs_done"] == 2
    assert ", 2 epochs" in (tmp_path / "log" / "tiny-2ep-sample_resnet-seed0.log").read_text().splitlines()[0]
    assert "# Results: preset `tiny`, 2 epochs" in (tmp_path / "results" / "tiny-2ep.md").read_text()
    bad = reproduce(driver(tmp_path), args(tmp_path, cifar_root, "--epochs", "0"))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith("--epochs 0: at least 1")


def test_an_unreadable_last_pth_restarts_the_row_with_a_warning(tmp_path, cifar_root):
    script = driver(tmp_path)
    last = tmp_path / "ck" / "tiny-sample_resnet-seed0" / "last.pth"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"PK\x03\x04 half of a checkpoint")
    res = reproduce(script, args(tmp_path, cifar_root))
    assert res.returncode == 0, res.stderr
    warnings = [ln for ln in res.stdout.splitlines() if ln.startswith("reproduce: warning:")]
    assert len(warnings) == 1 and str(last) in warnings[0] and "restarting" in warnings[0]
    assert table(tmp_path)["rows"][0]["status"] == "done"


def test_finished_runs_are_adopted_when_their_settings_match(tmp_path, cifar_root):
    other = tmp_path / "other"
    res = reproduce(driver(tmp_path), args(other, cifar_root))  # a finished run elsewhere
    assert res.returncode == 0, res.stderr
    (other / "log" / "tiny-sample_resnet-seed0.segments.json").unlink()
    res = reproduce(driver(tmp_path), args(tmp_path, cifar_root, "--adopt", str(other / "log")))
    assert res.returncode == 0, res.stderr
    (row,) = table(tmp_path)["rows"]
    assert row["status"] == "adopted" and row["command"].startswith("adopted: ")
    assert row["machines"] == [f"see {other / 'log'}"] and row["wall_s"] == row["train_s"] > 0
    assert row["test_acc"] == json.loads((other / "results" / "tiny.json").read_text())["rows"][0]["test_acc"]
    assert trainings(tmp_path, "tiny-sample_resnet-seed0") == []  # nothing trained here
    # a run of other settings is not taken
    res = reproduce(driver(tmp_path, epochs=2), args(tmp_path / "b", cifar_root, "--adopt", str(other / "log")))
    assert res.returncode == 0, res.stderr
    assert table(tmp_path / "b")["rows"][0]["status"] == "done"
    assert len(trainings(tmp_path / "b", "tiny-sample_resnet-seed0")) == 1


def test_long_cpu_presets_get_this_machines_fastest_settings(monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import reproduce
    opts = lambda *argv, model="resnet_scratch": reproduce.cpu_options(reproduce.parse_args(list(argv)), model)
    monkeypatch.setattr(reproduce, "cpu_bf16_is_fast", lambda: True)
    assert opts("--preset", "seed-cpu") == {"precision": "bf16", "micro_batch": 64}
    assert opts("--preset", "seed-cpu", model="sample_resnet") == {"precision": "bf16", "compile": True}
    assert opts("--preset", "seed-cpu", model="resnet") == {"precision": "bf16"}  # cached features: no step to tune
    assert opts("--preset", "seed-cpu", "--precision", "fp32") == {"precision": "fp32", "micro_batch": 32}
    assert opts("--preset", "seed-cpu", "--device", "cuda") == {}
    assert opts("--preset", "tiny") == {} and opts("--preset", "tiny", "--precision", "bf16") == {"precision": "bf16"}
    monkeypatch.setattr(reproduce, "cpu_bf16_is_fast", lambda: False)  # e.g. a Xeon without AMX
    assert opts("--preset", "seed-cpu") == {"precision": "fp32", "micro_batch": 32}
    # a resumed row is given the speed options again, the run's own ones (and no others) from its last.pth
    argv = reproduce.resume_argv("x/last.pth", {"epochs": 2, "compile": True}, {"weights": "w", "precision": "fp32"})
    assert argv == ["--resume", "x/last.pth", "--no-download", "--compile", "--precision", "fp32"]


def test_bf16_is_chosen_on_the_cpus_where_it_was_measured_faster(monkeypatch):
    import utils
    def cpu(vendor, avx512_bf16, amx):
        monkeypatch.setattr(utils, "cpu_vendor", lambda: vendor)
        monkeypatch.setattr(utils, "cpu_has_avx512_bf16", lambda: avx512_bf16)
        monkeypatch.setattr(utils, "cpu_has_amx", lambda: amx)
        return utils.cpu_bf16_is_fast()
    assert cpu("GenuineIntel", True, True)  # Sapphire Rapids: AMX
    assert cpu("AuthenticAMD", True, False)  # Zen 4
    assert not cpu("GenuineIntel", True, False)  # avx512_bf16 without AMX: bf16 0.8x
    assert not cpu("AuthenticAMD", False, False)  # AVX2-only EPYC


def cpuinfo(vendor, family, model, name):
    """Two processors of a /proc/cpuinfo, as a 2-core VM shows them."""
    one = (f"processor\t: {{}}\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
           f"model name\t: {name}\nflags\t\t: fpu avx512f\n")
    return one.format(0) + "\n" + one.format(1).replace(name, "the second core")


def test_two_cpus_behind_one_generic_name_are_told_apart(monkeypatch):
    # Two 2-core Xeons named only "Intel(R) Xeon(R) Processor" ran cpu_speed.py 1.6x apart: every
    # figure's machine line carries the family and model numbers, from the first processor alone.
    import report
    import utils
    xeon = "Intel(R) Xeon(R) Processor"
    sapphire = utils.cpu_name(utils.cpuinfo_fields(cpuinfo("GenuineIntel", 6, 143, xeon)))
    emerald = utils.cpu_name(utils.cpuinfo_fields(cpuinfo("GenuineIntel", 6, 207, xeon)))
    assert sapphire == f"{xeon} [family 6 model 143]" and emerald == f"{xeon} [family 6 model 207]"
    assert utils.cpuinfo_fields(cpuinfo("AuthenticAMD", 25, 17, "AMD EPYC 9R14"))["vendor_id"] == "AuthenticAMD"
    assert utils.cpu_name({"model name": "Some ARM core"}) == "Some ARM core"  # no numbers: the name alone
    assert utils.cpuinfo_fields("") == {} and utils.cpu_name({})  # not Linux: still a name
    monkeypatch.setattr(report, "cpu_name", lambda: emerald)
    assert report.machine_line(report.machine_info()).startswith(f"{xeon} [family 6 model 207] (")


def test_seeds_share_seed_0s_split():
    """Issue 32: --seeds trains every seed on seed 0's split (the frozen rows then reuse one
    feature cache, and all seeds are tested on the same images); one default seed passes nothing."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import reproduce
    assert reproduce.seed_options(0, [0]) == {}
    assert reproduce.seed_options(0, [0, 1, 2]) == {"seed": 0}
    assert reproduce.seed_options(2, [0, 1, 2]) == {"seed": 2, "split_seed": 0}
    argv = reproduce.train_argv("resnet", {**reproduce.PRESETS["seed-cpu"]["resnet"], **reproduce.seed_options(2, [0, 2])},
                                "r", {"cache_dir": "/c", "log_dir": "l"})
    assert argv[argv.index("--seed") + 1] == "2" and argv[argv.index("--split-seed") + 1] == "0"
    assert argv[argv.index("--cache-dir") + 1] == "/c" and "--no-augment" in argv
    # the frozen rows as the seed trained them: its augmentation, so no --no-augment
    aug = reproduce.train_argv("resnet_att", reproduce.PRESETS["seed-cpu-augmented"]["resnet_att"], "r", {})
    assert "--no-augment" not in aug and aug[aug.index("--epochs") + 1] == "10"
