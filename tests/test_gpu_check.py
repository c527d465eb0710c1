"""benchmarks/gpu_check.py, round two (issue 19), on the CPU: the parity check compares each batch
with its own twin, pass 1 fits its budget in the order of worth, a check past its limit leaves no
process behind, an unreadable result fails that check alone, --full-data fits its epochs to the
time, the report fits what a device call brings back; and every process a test starts computes on
the CPU, so the suite passes on a CUDA machine too. The whole script: test_benchmarks.py's rehearsal.
"""
import ast
import glob
import json
import os
import re
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from conftest import ROOT, run_script
from test_faults import cli  # noqa: F401 -- the fork server, a fixture

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import data  # noqa: E402
import gpu_check  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Parity of the batched augmentation


class Fresh:
    """A loader whose every batch is a new tensor, as a GPU's batches are once copied to the host."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return ((x.clone(), y) for x, y in self.loader)


def images(seed=0, n=64):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def cpu_loader(x, y, train):
    return data.TensorLoader(x, y, 16, 32, train, "cpu", seed=1, channels_last=True)


def test_parity_compares_each_batch_with_its_twin_when_buffers_alias():
    x, y = images()
    for train in (True, False):  # a correct device side against the CPU's one reused buffer: no difference
        assert gpu_check.max_difference(Fresh(cpu_loader(x, y, train)), cpu_loader(x, y, train)) == 0.0
    # both sides alias, and only the first batch differs: lists of batches would compare the last ones
    other = x.copy()
    other[:16] = 255 - other[:16]
    want = max((a - b).abs().max().item() for (a, _), (b, _) in zip(Fresh(cpu_loader(x, y, False)),
                                                                    Fresh(cpu_loader(other, y, False))))
    assert want > 1 and gpu_check.max_difference(cpu_loader(x, y, False), cpu_loader(other, y, False)) == want


def test_parity_on_the_cpu_is_exact_and_a_gap_is_named():
    result = gpu_check.parity("cpu")
    assert result == {mode: {"train": 0.0, "eval": 0.0} for mode in ("tf32_off", "tf32_on")}
    assert gpu_check.parity_verdict(result) is None
    result["tf32_off"]["train"] = 4.226  # the aliasing bug's figure
    assert gpu_check.parity_verdict(result) == "tf32_off 4.23 > 0.0001"


# ----------------------------------------------------------------------------------------------
# Running checks

CHILD = """
import signal, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c",
                           "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)"])
open(sys.argv[1], "w").write(str(worker.pid))
if sys.argv[2] == "saves":  # as train.py: ^C -> save, exit 130
    signal.signal(signal.SIGINT, lambda *a: (print("saved", "last.pth", flush=True), sys.exit(130)))
else:  # a hang that ignores ^C
    signal.signal(signal.SIGINT, signal.SIG_IGN)
print("started", flush=True)
time.sleep(600)
"""


def gone(pid):
    """True when ``pid`` has ended (a zombie waiting for its reaper counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("child, stopped, code", [("saves", "interrupted", 130), ("hangs", "killed", -9)])
def test_a_check_past_its_limit_gets_sigint_then_sigkill_and_leaves_no_process(child, stopped, code, tmp_path):
    """A torchrun agent killed alone left its train.py worker on the GPU for the later checks."""
    pid_file, log = tmp_path / "worker.pid", tmp_path / "check.log"
    rc, how, seconds = gpu_check.run_group([sys.executable, "-c", CHILD, str(pid_file), child], str(log), limit=8,
                                           grace=4)
    assert (rc, how) == (code, stopped), log.read_text()
    assert 4 <= seconds < 12 and "started" in log.read_text()
    assert ("saved last.pth" in log.read_text()) == (child == "saves")
    worker = int(pid_file.read_text())
    deadline = time.time() + 5
    while not gone(worker) and time.time() < deadline:
        time.sleep(0.05)
    assert gone(worker), "the check's own child outlived it"


def test_a_check_that_ends_in_time_keeps_its_exit_code(tmp_path):
    rc, how, seconds = gpu_check.run_group([sys.executable, "-c", "import sys; print('x'); sys.exit(3)"],
                                           str(tmp_path / "log"), limit=30)
    assert (rc, how) == (3, None) and seconds < 30


WARNS_AFTER_PARITY = """
import sys, warnings
sys.path.insert(0, {bench!r})
import gpu_check
gpu_check.main(["--parity-json", sys.argv[1], "--device", "cpu"])
warnings.warn("TF32 settings will be deprecated")  # a warning as the log's last line
"""


def checks(tmp_path, *argv):
    """gpu_check's pass 1 over a work folder in tmp_path; ``published`` counts the reports."""
    args = gpu_check.parse_args(["--rehearse", "--out", str(tmp_path / "out"), *argv])
    os.makedirs(tmp_path / "logs", exist_ok=True)
    published = []
    return gpu_check.Checks(args, str(tmp_path), time.time() + 120, lambda: published.append(1)), published


def test_an_unreadable_result_fails_that_check_alone(tmp_path):
    c, published = checks(tmp_path)
    script = tmp_path / "parity.py"
    script.write_text(WARNS_AFTER_PARITY.format(bench=os.path.join(ROOT, "benchmarks")))
    result = tmp_path / "parity.json"
    row = c.run("parity", [sys.executable, str(script), str(result)],
                parse=lambda: gpu_check.parity_row(gpu_check.read_json(str(result))))
    assert "deprecated" in row["summary"]  # the warning, last in the log, no longer matters
    assert row["status"] == "ok" and row["max_diff"]["tf32_on"] == {"train": 0.0, "eval": 0.0}, row
    row = c.run("stop", [sys.executable, "-c", "pass"],  # exits 0 and writes no last.pth
                parse=lambda: gpu_check.bring_back(str(tmp_path / "none.pth"), str(tmp_path / "back.pth")))
    assert row["ok"] is False and row["status"].startswith("FAILED: result missing or unreadable (FileNotFoundError")
    assert c.run("resume", [sys.executable, "-c", "pass"])["status"] == "ok"  # the next check still runs
    assert len(published) == 3
    assert [r["status"] for r in c.rows if r["check"] in ("torchrun", "compile")] == ["pending", "pending"]


def test_a_check_with_no_time_left_is_skipped_and_said_so(tmp_path):
    c, published = checks(tmp_path, "--checks", "tests", "stop")
    c.deadline = time.time() + 1
    assert c.run("tests", [sys.executable, "-c", "pass"])["status"] == "skipped: pass 1 out of time"
    assert c.run("parity", [sys.executable, "-c", "pass"])["status"] == "not selected (--checks)"
    assert len(published) == 1


# ----------------------------------------------------------------------------------------------
# Time: pass 1's order and budget, the README's device command, --full-data


def test_pass_one_runs_in_the_order_of_worth_and_fits_its_budget():
    assert [name for name, _, _ in gpu_check.CHECKS] == [
        "versions", "tests", "parity", "stop", "resume", "evaluate", "torchrun", "sync", "bench", "compile"]
    assert gpu_check.CHECKS[-1][1] is None  # compile: whatever is left
    assert sum(cuda or 0 for _, cuda, _ in gpu_check.CHECKS) + gpu_check.PACK_S <= gpu_check.BUDGET_S
    args = gpu_check.parse_args(["--out", "x"])  # a device call: pass 1 alone, up to the budget
    assert gpu_check.deadlines(args, 0) == (gpu_check.BUDGET_S - gpu_check.PACK_S, None)
    args = gpu_check.parse_args(["--rehearse", "--out", "x"])  # the rehearsal: pass 2 too
    assert gpu_check.deadlines(args, 0) == (200, 300 - gpu_check.PACK_S)


STARTUP_S = 180  # a device machine's start-up, at most (assumed: "minutes"); one per call when not kept warm
DEVICE_S, MIN_START_S = 15 * 60, 4 * 60  # a task's device time; no machine starts with less left


def readme_gpu_section():
    text = open(os.path.join(ROOT, "docs", "gpus.md")).read()
    return text[text.index("### The GPU check"):][:6000].split("\n## ")[0]


def assert_leaves_room_for_a_second_call(line):
    """A device command's --budget and timeout_s: the script ends inside its call, and a second call
    (with a start-up of its own) still fits the task's device time."""
    timeout = int(re.search(r"timeout_s\W+(\d+)", line).group(1))
    budget = float(re.search(r"--budget (\d+)", line).group(1))
    assert budget + 20 <= timeout, f"the script ends by its budget, with room to start and pack: {line}"
    left = DEVICE_S - STARTUP_S - timeout - 30  # after the first call and an idle wait
    assert left >= MIN_START_S and left >= STARTUP_S + timeout, f"no second call fits: {line}"


def test_the_readme_device_commands_leave_room_for_a_second_call():
    lines = [ln for ln in readme_gpu_section().splitlines() if "timeout_s" in ln and "gpu_check.py" in ln]
    assert len(lines) == 2  # pass 1, and --full-data
    for line in lines:
        assert_leaves_room_for_a_second_call(line)


def test_stage_data_splits_the_set_into_calls_that_fit(tmp_path, monkeypatch, capsys, cifar_root, weights_path):
    import stage_data
    monkeypatch.setattr(stage_data, "ROOT", str(tmp_path))  # its stage/ folder, in place of the working tree's
    assert stage_data.main(["--data-dir", cifar_root, "--weights", weights_path]) == 0
    out = capsys.readouterr().out
    stage = tmp_path / "stage"
    assert sorted(os.listdir(stage)) == ["1", "2", "3", "4"] and out.count('carry ["stage/') == 4
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True).stdout.split("\0")
    tree = sum(os.path.getsize(os.path.join(ROOT, f)) for f in tracked if os.path.isfile(os.path.join(ROOT, f)))
    for part in os.listdir(stage):
        size = sum(os.path.getsize(stage / part / f) for f in os.listdir(stage / part))
        assert tree + size + 2**20 < 64 * 2**20, (part, size, tree)  # a call carries 64 MiB, the tree included
    assert sorted(f for part in os.listdir(stage) for f in os.listdir(stage / part)) == sorted(
        [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin", "resnet50.pth"])
    (line,) = [ln for ln in out.splitlines() if "--full-data --model MODEL" in ln]
    assert_leaves_room_for_a_second_call(line)


def test_full_data_trains_one_model_with_the_epochs_that_fit():
    args = gpu_check.parse_args(["--full-data", "--model", "resnet_scratch", "--out", "x"])
    assert gpu_check.pass2_models(args) == ["resnet_scratch"] and args.checks == ["versions", "bench"]
    first_end, end = gpu_check.deadlines(args, 0)
    bench = {"rows": [{"kind": "train", "model": "resnet_scratch", "project_img_s": 2500.0}]}  # ~ an H200, bf16
    epochs = gpu_check.epochs_that_fit("resnet_scratch", bench, end - first_end, 45_000)
    train_s = epochs * 45_000 / 2500  # at the bench's rate; train.py's own reaches SAFETY of it
    assert 1 <= epochs < 10 and gpu_check.RUN_OVERHEAD_S + train_s / gpu_check.SAFETY <= end - first_end
    opts = gpu_check.run_options(args, "resnet_scratch", epochs)
    assert opts == {"image_size": 224, "epochs": epochs, "val_split": 5000, "val_every": 5, "weights": "none"}
    with pytest.raises(SystemExit):  # a frozen random backbone measures nothing
        gpu_check.parse_args(["--full-data", "--model", "resnet", "--out", "x"])


def test_epochs_that_fit_the_measured_throughput():
    bench = {"rows": [{"kind": "train", "model": "resnet_scratch", "project_img_s": 3000.0},
                      {"kind": "train", "model": "resnet_att_scratch", "error": "CUDA out of memory"}]}
    seconds = gpu_check.RUN_OVERHEAD_S + 100  # 100 s of training at 0.7 x 3,000 img/s: 210,000 images
    assert gpu_check.epochs_that_fit("resnet_scratch", bench, seconds, 10_000) == 21
    assert gpu_check.epochs_that_fit("resnet_scratch", bench, seconds, 1_000) == gpu_check.MAX_EPOCHS
    assert gpu_check.epochs_that_fit("resnet_scratch", bench, 1, 10_000) == 1
    assert gpu_check.epochs_that_fit("resnet_att_scratch", bench, seconds, 10_000) == gpu_check.FALLBACK_EPOCHS


# ----------------------------------------------------------------------------------------------
# The report: at most 8 files at --out's top level, rewritten whole


def test_the_report_is_a_few_top_level_files_naming_every_check(tmp_path):
    c, _ = checks(tmp_path)
    for i in range(20):  # a pass's logs
        (tmp_path / "logs" / f"check-{i}.log").write_text("line\n")
    (tmp_path / "ck" / "run").mkdir(parents=True)
    (tmp_path / "ck" / "run" / "last.pth").write_bytes(b"0" * 1000)  # checkpoints stay in the work folder
    out = tmp_path / "out"
    out.mkdir()
    meta = {"command": "x", "machine": gpu_check.versions("cpu"), "budget": 300, "rehearse": True, "image_size": 32,
            "date": "today", "data": "d", "wall_s": 1.0}
    c.row("tests").update(status="FAILED (exit 1)", ok=False, summary="1 failed")
    for _ in range(2):  # rewritten, not added to
        path = gpu_check.publish(str(out), "gpu-base", str(tmp_path), meta, c.rows, [])
    assert sorted(os.listdir(out)) == ["gpu-base.json", "gpu-base.md", "logs.tar.gz"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert len(tar.getnames()) == 21 and not any(n.endswith(".pth") for n in tar.getnames())
    md = open(path).read()
    for name, _, _ in gpu_check.CHECKS:
        assert re.search(rf"^\| {name} \| (pending|ok|FAILED \(exit 1\)) \|", md, re.M), name
    assert json.loads((out / "gpu-base.json").read_text())["checks"][1]["status"] == "FAILED (exit 1)"


def test_a_short_budget_still_brings_back_a_report_naming_every_check(tmp_path):
    """The whole script, rehearsed with less time than its checks need: it ends by its budget and
    its report says which checks ran and which were skipped for time."""
    out, budget = tmp_path / "out", 30
    start = time.time()
    r = run_script("benchmarks/gpu_check.py", "--rehearse", "--budget", budget, "--out", out, timeout=120)
    wall = time.time() - start
    assert wall < budget + 15, (wall, r.stdout[-2000:])  # + the interpreter's start and imports
    files = os.listdir(out)
    (report,) = [f for f in files if f.endswith(".json")]
    assert set(files) <= {report, report[:-5] + ".md", "logs.tar.gz", "device-last.pth"}, files
    statuses = {c["check"]: c["status"] for c in json.loads((out / report).read_text())["checks"]}
    assert list(statuses) == [name for name, _, _ in gpu_check.CHECKS]
    assert statuses["versions"] == "ok" and statuses["compile"] == "skipped: pass 1 out of time", statuses
    assert all(re.match(r"ok$|FAILED|timed out|skipped: pass 1 out of time$", s) for s in statuses.values()), statuses
    assert r.returncode == 1  # not everything was checked


# ----------------------------------------------------------------------------------------------
# The suite on a CUDA machine: every process a test starts is on the CPU

PROBE = "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))\n"


def test_processes_started_by_tests_see_no_gpu(tmp_path, cli):  # noqa: F811
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    assert run_script(probe).stdout == "''\n"
    assert cli(str(probe)).stdout == "''\n"  # the fork server's children


def test_every_subprocess_a_test_starts_pins_the_cpu():
    """Each subprocess.run/Popen in tests/ but of a named program (mount) passes env=child_env(...)."""
    unpinned = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "*.py"))):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and ast.unparse(node.func) in ("subprocess.run", "subprocess.Popen")):
                continue
            program = node.args[0] if node.args else None
            if isinstance(program, ast.List) and isinstance(program.elts[0], ast.Constant):
                continue  # a named program (mount, umount), not Python
            env = next((k.value for k in node.keywords if k.arg == "env"), None)
            if env is None or "child_env(" not in ast.unparse(env):
                unpinned.append(f"{os.path.basename(path)}:{node.lineno}")
    assert not unpinned, f"subprocesses without env=child_env(...): {unpinned}"


def pins(name):
    """{package: line} of a requirements file and the files it includes (-r)."""
    out = {}
    for line in open(os.path.join(ROOT, name)):
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            out.update(pins(line[3:]))
        elif line:
            out[re.split(r"[=<>!~ ]", line)[0].lower()] = line
    return out


def test_the_torch_2_11_requirements_differ_only_in_torch():
    old, new = pins("requirements-torch211.txt"), pins("requirements-test.txt")
    assert (old["torch"], old["torchvision"]) == ("torch==2.11.0", "torchvision==0.26.0")
    same = lambda pins: {k: v for k, v in pins.items() if k not in ("torch", "torchvision")}
    assert same(old) == same(new)
