"""Issue 5, faults: interrupts, crashes and full disks lose nothing; every bad input is one clear line.

Most cases run the real scripts through a small fork server (``cli``): one Python process imports
torch, torchvision, train and evaluate once, then forks a fresh child per case that runs the script
exactly as ``python train.py ...`` would (``runpy`` as ``__main__``, its own stdout/stderr files, its
own exit code, its own pid to signal or kill). That turns ~6 s of imports per case into
milliseconds, so every case stays in the fast suite; ``test_fork_server_matches_a_real_process``
shows both ways give the same result.
"""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import ROOT, child_env, run_script
from utils import UserError

# A tiny sample_resnet run: 6 steps of 32 images per epoch, 2 epochs, validation every epoch.
TINY = ["--model", "sample_resnet", "--image-size", "32", "--epochs", "2", "--train-subset", "192",
        "--val-split", "100", "--test-subset", "101", "--batch-size", "32", "--val-every", "1",
        "--device", "cpu", "--seed", "0", "--no-download"]
BEST = "Sample_ResNet.pth"
TIMEOUT = 300
# One thread per process: with 2 cores shared by other processes, two OpenMP threads spin-wait
# on each other and a step is ~5x slower; and every run compared bit for bit uses the same threads.
ENV = {"OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------------------------
# The fork server


SERVER = r"""
import json, os, runpy, sys, time, traceback
sys.path.insert(0, sys.argv[1])
import torch, torchvision, matplotlib.pyplot  # the slow imports, done once
import train, evaluate

def child(req):
    code = 1
    try:
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.argv = [req["script"], *req["argv"]]
        try:
            runpy.run_path(req["script"], run_name="__main__")
            code = 0
        except SystemExit as e:  # what the interpreter does with sys.exit(x)
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        child(req)
    print(json.dumps({"pid": pid}), flush=True)  # the caller may signal it
    deadline = time.time() + req["timeout"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, 9)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.01)
    rc = os.waitstatus_to_exitcode(status)
    print(json.dumps({"returncode": rc}), flush=True)
"""


class Forked:
    """One running script: ``pid`` to signal, ``wait_for_line``, then ``wait`` -> CompletedProcess."""

    def __init__(self, server, argv, out, err):
        self.server, self.argv, self.out, self.err = server, argv, out, err
        self.pid = json.loads(server.reply())["pid"]

    def wait_for_line(self, prefix, timeout=TIMEOUT):
        """Poll stdout for a line starting with ``prefix`` (the script's stdout is unbuffered)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if os.path.exists(self.out):  # the child may not have opened it yet
                with open(self.out) as f:
                    if any(line.startswith(prefix) for line in f):
                        return
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:  # it ended without printing the line
                res = self.wait()
                pytest.fail(f"no line {prefix!r}; exit {res.returncode}\n{res.stdout}\n{res.stderr}")
            time.sleep(0.02)
        pytest.fail(f"no line {prefix!r} in {timeout} s")

    def wait(self):
        returncode = json.loads(self.server.reply())["returncode"]
        with open(self.out) as f_out, open(self.err) as f_err:
            return subprocess.CompletedProcess(self.argv, returncode, f_out.read(), f_err.read())


class ForkServer:
    def __init__(self, workdir):
        self.workdir, self.n = workdir, 0
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, ROOT], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT, env=child_env(ENV))

    def reply(self):
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return line

    def start(self, script, *argv, env=None, cwd=None, timeout=TIMEOUT):
        """Start ROOT/script (or an absolute path) with argv in a fresh fork: a Forked."""
        self.n += 1
        out, err = (os.path.join(self.workdir, f"{self.n}.{s}") for s in ("out", "err"))
        req = {"script": os.path.join(ROOT, script), "argv": [str(a) for a in argv], "cwd": str(cwd or ROOT),
               "env": child_env(ENV, env), "stdout": out, "stderr": err,
               "timeout": timeout}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return Forked(self, req["argv"], out, err)

    def __call__(self, script, *argv, **kwargs):
        """Run a script to its end: a CompletedProcess."""
        return self.start(script, *argv, **kwargs).wait()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def cli(tmp_path_factory):
    server = ForkServer(str(tmp_path_factory.mktemp("forks")))
    yield server
    server.close()


# ----------------------------------------------------------------------------------------------
# Shared runs and helpers


class Run:
    def __init__(self, base, name):
        self.base, self.name = base, name
        self.out, self.log_dir = os.path.join(base, "ck"), os.path.join(base, "log")
        self.dir = os.path.join(self.out, name)
        self.last, self.best = os.path.join(self.dir, "last.pth"), os.path.join(self.dir, BEST)

    def args(self, *extra):
        return [*TINY, "--out", self.out, "--log-dir", self.log_dir, "--run-name", self.name, *extra]

    def copy(self, dest, name=None):
        """This run's files under ``dest`` (a new base), optionally renamed."""
        new = Run(str(dest), name or self.name)
        shutil.copytree(self.dir, new.dir)
        return new


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cifar_root):
    """The uninterrupted reference run: 2 epochs, complete."""
    run = Run(str(tmp_path_factory.mktemp("tiny")), "tiny")
    res = run_script("train.py", *run.args("--data-dir", cifar_root), env=ENV)
    assert res.returncode == 0, res.stderr
    run.stdout = res.stdout
    return run


@pytest.fixture(scope="session")
def half_run(tmp_path_factory, cifar_root, cli):
    """The same run stopped after epoch 1 (last.pth and the best at epoch 1); copy before use."""
    run = Run(str(tmp_path_factory.mktemp("half")), "half")
    res = cli("train.py", *run.args("--data-dir", cifar_root, "--stop-after", "1"))
    assert res.returncode == 0, res.stderr
    return run


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(path_a, path_b):
    a, b = load(path_a)["state_dict"], load(path_b)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def printed_test_acc(stdout):
    return re.findall(r"Test Acc : ([0-9.]+)", stdout)


def tmp_files(folder):
    return [n for n in os.listdir(folder) if ".tmp" in n]


def assert_one_line_error(res, code=None, *words):
    """Non-zero exit (``code`` when given), no traceback, exactly one non-empty stderr line naming
    the problem (each of ``words``, case-insensitive)."""
    assert res.returncode != 0, res.stdout + res.stderr
    if code is not None:
        assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{res.stderr}"
    for w in words:
        assert w.lower() in lines[0].lower(), f"{w!r} not in {lines[0]!r}"
    return lines[0]


def assert_resumed_at(stdout, ckpt):
    """Issue 33: the resumed process starts where ``ckpt`` (its last.pth before the resume) stopped:
    its first progress line is in that epoch, past the saved step, within one log interval of it
    (a run that silently started again from step 0 would still end with the same weights on a
    deterministic CPU, so the weights alone cannot tell)."""
    lines = [tuple(map(int, m)) for m in re.findall(r"^  epoch (\d+)/\d+ step (\d+)/(\d+) ", stdout, re.M)]
    assert lines, stdout[-2000:]
    epoch, step, total = lines[0]
    every = max(total // 10, 1)  # report.EpochProgress's interval
    if ckpt["step"] == 0:  # saved at an epoch's end: the next epoch from its first step
        assert (epoch, step) == (ckpt["epoch"] + 1, every), (lines[0], ckpt["epoch"], ckpt["step"])
    else:
        assert epoch == ckpt["epoch"] + 1 and ckpt["step"] < step <= ckpt["step"] + every, \
            (lines[0], ckpt["epoch"], ckpt["step"])
    assert re.search(r"^resuming ", stdout, re.M), stdout[:500]


# ----------------------------------------------------------------------------------------------
# Interrupts, crashes, full disks, NaN


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_and_resumes_bit_identical(sig, tmp_path, tiny_run, cifar_root, cli):
    run = Run(str(tmp_path), "sig")
    proc = cli.start("train.py", *run.args("--data-dir", cifar_root))
    proc.wait_for_line("  epoch 1/2 step")
    os.kill(proc.pid, sig)
    res = proc.wait()
    assert res.returncode == 128 + sig, res.stderr
    assert res.stderr == ""
    assert f"Resume with: python train.py --resume {run.dir}/last.pth" in res.stdout
    ckpt = load(run.last)
    assert ckpt["epoch"] in (0, 1) and ckpt["step"] >= 1  # mid-epoch, after the step it was in
    if sig == signal.SIGINT:
        return  # resuming is the same for both; SIGTERM's run does it
    res = cli("train.py", "--resume", run.last, "--data-dir", cifar_root)  # the resume it printed
    assert res.returncode == 0, res.stderr
    assert_resumed_at(res.stdout, ckpt)
    assert_same_weights(run.last, tiny_run.last)
    assert printed_test_acc(res.stdout) == printed_test_acc(tiny_run.stdout)


def test_kill9_then_resume_is_bit_identical(tmp_path, tiny_run, cifar_root, cli):
    run = Run(str(tmp_path), "k9")
    proc = cli.start("train.py", *run.args("--data-dir", cifar_root))
    proc.wait_for_line("  epoch 2/2 step 1/")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait().returncode == -signal.SIGKILL
    ckpt = load(run.last)
    assert ckpt["epoch"] == 1, "killed too late"  # the end of epoch 1: epoch 2 never finished
    res = cli("train.py", "--resume", run.last, "--data-dir", cifar_root)
    assert res.returncode == 0, res.stderr
    assert_resumed_at(res.stdout, ckpt)
    assert_same_weights(run.last, tiny_run.last)
    assert printed_test_acc(res.stdout) == printed_test_acc(tiny_run.stdout)
    assert sorted(os.listdir(run.dir)) == sorted(["last.pth", BEST])


def driver(tmp_path, body):
    """A script that patches something, then runs train.py's main as the command line would."""
    path = tmp_path / "driver.py"
    path.write_text(f"import errno, io, os, sys\nsys.path.insert(0, {ROOT!r})\nimport torch, train, utils\n"
                    + textwrap.dedent(body) + "\nsys.exit(utils.run_cli(train.main))\n")
    return str(path)


def test_crash_inside_a_save_keeps_the_previous_checkpoint(tmp_path, half_run, tiny_run, cifar_root, cli):
    run = half_run.copy(tmp_path)
    before = {p: sha(p) for p in (run.last, run.best)}
    crash = driver(tmp_path, """
        real_save = torch.save
        def half_save(obj, f, *a, **k):  # write half the bytes, then die as kill -9 would
            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            f.flush()
            os._exit(137)
        torch.save = half_save
    """)
    res = cli(crash, "--resume", run.last, "--data-dir", cifar_root)
    assert res.returncode == 137, res.stderr
    assert tmp_files(run.dir), "the crash should have hit a temporary file"
    assert {p: sha(p) for p in before} == before  # nothing replaced, nothing half-written
    assert load(run.last)["epoch"] == 1
    res = cli("train.py", "--resume", run.last, "--data-dir", cifar_root)
    assert res.returncode == 0, res.stderr
    assert_same_weights(run.last, tiny_run.last)
    assert tmp_files(run.dir) == []  # the dead process's temporary file is cleaned up


def test_disk_full_keeps_checkpoints_and_says_so(tmp_path, half_run, cifar_root, cli):
    run = half_run.copy(tmp_path)
    before = {p: sha(p) for p in (run.last, run.best)}
    full = driver(tmp_path, """
        def full_save(obj, f, *a, **k):  # some bytes land, then the disk is full
            f.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        torch.save = full_save
    """)
    res = cli(full, "--resume", run.last, "--data-dir", cifar_root)
    assert_one_line_error(res, 1, "could not write checkpoint", "No space left on device", "intact")
    assert {p: sha(p) for p in before} == before
    assert tmp_files(run.dir) == []
    assert load(run.last)["epoch"] == 1


def test_a_second_ctrl_c_stops_at_once_with_one_line(capsys, monkeypatch):
    import utils
    signals = utils.StopSignals()
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(sys, "argv", ["train.py"])

    def main():
        signals.handle(signal.SIGINT, None)  # the first ^C: stop after this step
        signals.handle(signal.SIGINT, None)  # the second: stop now
    try:
        with pytest.raises(SystemExit) as e:
            utils.run_cli(main)
    except KeyboardInterrupt:  # caught here: pytest would take it for the user's and stop the session
        pytest.fail("KeyboardInterrupt escaped run_cli: the user gets a traceback")
    assert e.value.code == 130
    assert capsys.readouterr().err == "train.py: interrupted\n"


def test_nan_loss_stops_with_epoch_and_step(tmp_path, cifar_root, cli):
    run = Run(str(tmp_path), "nan")
    res = cli("train.py", *run.args("--data-dir", cifar_root, "--lr", "1e30"))
    line = assert_one_line_error(res, 1, "loss became", "epoch 1, step")
    assert re.search(r"loss became (nan|inf|-inf) at epoch 1, step [2-6] ", line), line
    assert not os.path.exists(run.last)  # no checkpoint of a diverged state


def test_nan_loss_keeps_the_last_good_checkpoint(tmp_path, half_run, cifar_root, cli):
    run = half_run.copy(tmp_path)
    ckpt = load(run.last)  # epoch 1 trained sanely; make epoch 2's learning rate absurd
    ckpt["scheduler"]["base_lrs"] = [1e30 for _ in ckpt["scheduler"]["base_lrs"]]
    torch.save(ckpt, run.last)
    before = {p: sha(p) for p in (run.last, run.best)}
    res = cli("train.py", "--resume", run.last, "--data-dir", cifar_root)
    assert_one_line_error(res, 1, "loss became", "epoch 2, step", "last good checkpoint")
    assert {p: sha(p) for p in before} == before


def new_run_name(args):
    """checkpoints.new_run_name as train.py calls it."""
    import checkpoints
    from models import MODELS
    return checkpoints.new_run_name(args.model, args.run_name, args.overwrite, args.out, args.log_dir,
                                    [m[1] for m in MODELS.values()])


def test_runs_with_the_same_settings_get_their_own_names(tmp_path, monkeypatch):
    import train
    monkeypatch.setattr(time, "strftime", lambda fmt: "20260101-000000")  # the same second
    args, _ = train.parse_args([*TINY, "--out", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "log")])
    first, second = new_run_name(args), new_run_name(args)  # before either writes a file
    assert first == "sample_resnet-20260101-000000" and second == first + "-2"
    assert os.path.isdir(tmp_path / "ck" / first) and os.path.isdir(tmp_path / "ck" / second)


def test_overwrite_starts_the_named_run_afresh(tmp_path):
    import train
    base, ck = tmp_path / "log", tmp_path / "ck" / "x"
    base.mkdir()
    ck.mkdir(parents=True)
    for path in [base / "x.log", base / "x.csv", base / "x.png", base / "x-confusion.png", ck / "last.pth", ck / BEST]:
        path.write_text("an older run\n")
    argv = [*TINY, "--out", str(tmp_path / "ck"), "--log-dir", str(base), "--run-name", "x"]
    with pytest.raises(UserError) as e:
        new_run_name(train.parse_args(argv)[0])
    assert e.value.exit_code == 2
    assert len(os.listdir(base)) == 4  # refused: nothing touched
    assert new_run_name(train.parse_args(argv + ["--overwrite"])[0]) == "x"
    # the old log, CSV and curves would mix with the new run's; old checkpoints would pass for its
    assert os.listdir(base) == [] and os.listdir(ck) == []


# ----------------------------------------------------------------------------------------------
# Bad input: one case per row, each one clear line on stderr


@pytest.fixture(scope="session")
def bad(tmp_path_factory, tiny_run, cifar_root):
    """Broken files, each made once: data folders, weights, checkpoints, images."""
    import numpy as np
    from PIL import Image
    d = tmp_path_factory.mktemp("bad")
    f = type("Files", (), {})()
    f.dir, f.root, f.tiny = d, cifar_root, tiny_run
    good = os.path.join(cifar_root, "cifar-10-batches-bin")
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]

    def data_copy(name, broken=None, drop=None):  # symlinks to the good files, one file changed
        folder = d / name / "cifar-10-batches-bin"
        folder.mkdir(parents=True)
        for n in names:
            if n == drop:
                continue
            if n == (broken or [None])[0]:
                (folder / n).write_bytes(broken[1](open(os.path.join(good, n), "rb").read()))
            else:
                os.symlink(os.path.join(good, n), folder / n)
        return str(d / name)

    flip = lambda b: b[:5000] + bytes([b[5000] ^ 0xFF]) + b[5001:]  # same size, one byte changed
    f.bad_md5 = data_copy("md5", ("data_batch_3.bin", flip))
    f.truncated = data_copy("trunc", ("test_batch.bin", lambda b: b[:len(b) // 2 - 7]))
    f.lacking = data_copy("lacking", drop="data_batch_5.bin")
    (d / "empty").mkdir()
    f.empty, f.nowhere = str(d / "empty"), str(d / "nowhere")

    def save(name, obj):
        torch.save(obj, d / name)
        return str(d / name)

    def write(name, data):
        (d / name).write_bytes(data)
        return str(d / name)

    import torchvision
    sd = {k: v.half() for k, v in torchvision.models.resnet50().state_dict().items()}
    sd["conv1.weight"] = torch.zeros(64, 3, 3, 3, dtype=torch.half)  # 3x3 where ResNet-50 has 7x7
    f.w_shapes = save("w_shapes.pth", sd)
    f.w_truncated = write("w_trunc.pth", open(f.w_shapes, "rb").read()[:1_000_000])
    f.w_list = save("w_list.pth", [1.0, 2.0, 3.0])
    f.text = write("notes.txt", b"not a PyTorch file, not an image\n")

    ckpt = load(tiny_run.best)
    f.c_truncated = write("c_trunc.pth", open(tiny_run.best, "rb").read()[:50_000])
    f.c_state_dict = save("c_sd.pth", ckpt["state_dict"])
    other = dict(ckpt, model=dict(ckpt["model"], name="resnet"), args=dict(ckpt["args"], model="resnet"))
    f.c_other_model = save("c_other.pth", other)  # a resnet record with sample_resnet weights
    f.c_ddp = save("c_ddp.pth", dict(ckpt, state_dict={"module." + k: v for k, v in ckpt["state_dict"].items()}))
    f.c_old = save("c_old.pth", {"model": "sample_resnet", "state_dict": ckpt["state_dict"], "args": {}})

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(d / "img.png")
    f.i_truncated = write("i_trunc.png", (d / "img.png").read_bytes()[:60])
    return f


def out_args(f):
    return ["--out", str(f.dir / "ck"), "--log-dir", str(f.dir / "log")]


def train_(*extra, data=None):
    """train.py on the tiny settings plus ``extra``; ``data`` a --data-dir (default: the real one)."""
    return lambda f: ("train.py", [*TINY, *out_args(f), "--data-dir", data(f) if data else f.root, *extra], {})


def resume(path):
    return lambda f: ("train.py", ["--resume", path(f), "--data-dir", f.root], {})


def evaluate(path, *extra):
    return lambda f: ("evaluate.py", [path(f), "--data-dir", f.root, "--no-download", *extra], {})


def weights(path):
    return lambda f: train_("--model", "resnet", "--weights", path(f))(f)


# a closed local port: a download fails at once, contacting no one
OFFLINE = {k: "http://127.0.0.1:9" for k in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")}


def offline(f):
    argv = [a for a in TINY if a != "--no-download"] + out_args(f) + ["--data-dir", f.empty]
    return "train.py", argv, OFFLINE


def weights_offline(f):  # torchvision's weights, not in an empty $TORCH_HOME
    script, argv, _ = train_("--model", "resnet", "--weights", "imagenet")(f)
    return script, argv, dict(OFFLINE, TORCH_HOME=str(f.dir / "torch_home"))


best = lambda f: f.tiny.best
missing = lambda f: str(f.dir / "missing.pth")

# name: (expected exit code, words the one line must contain, the command)
BAD_INPUT = {
    # usage
    "unknown model": (2, ["--model", "invalid choice", "'foo'"], train_("--model", "foo")),
    "epochs 0": (2, ["--epochs", "positive"], train_("--epochs", "0")),
    "epochs negative": (2, ["--epochs", "positive"], train_("--epochs", "-3")),
    "batch size 0": (2, ["--batch-size", "positive"], train_("--batch-size", "0")),
    "image size 0": (2, ["--image-size", "positive"], train_("--image-size", "0")),
    "image size negative": (2, ["--image-size", "positive"], train_("--image-size", "-32")),
    "image size huge": (2, ["--image-size 5000", "larger than 4096"], train_("--image-size", "5000")),
    "seed negative": (2, ["--seed -1", "not from 0"], train_("--seed", "-1")),
    "seed beyond 64 bits": (2, ["--seed", "2**64"], train_("--seed", str(2**64))),
    "log dir empty": (2, ["--log-dir is empty"], train_("--log-dir", "")),
    "out empty": (2, ["--out is empty"], train_("--out", " ")),
    "lr 0": (2, ["--lr", "positive"], train_("--lr", "0")),
    "lr negative": (2, ["--lr", "positive"], train_("--lr", "-0.1")),
    "lr nan": (2, ["--lr", "positive"], train_("--lr", "nan")),
    "val split = train set": (2, ["--val-split 50000", "no training images"], train_("--val-split", "50000")),
    "val split not balanced": (2, ["--val-split 105", "multiple of 10"], train_("--val-split", "105")),
    "train subset > data": (2, ["--train-subset 49901", "larger"], train_("--train-subset", "49901")),
    "test subset > data": (2, ["--test-subset 10001", "larger"], train_("--test-subset", "10001")),
    "batch > train subset": (2, ["--batch-size 128", "larger", "64"],
                             train_("--train-subset", "64", "--batch-size", "128")),
    "run name exists": (2, ["run tiny exists", "--overwrite"],
                        lambda f: ("train.py", [*f.tiny.args("--data-dir", f.root)], {})),
    "resume other model": (2, ["--model", "sample_resnet", "resnet"],
                           lambda f: ("train.py", ["--resume", f.tiny.last, "--model", "resnet"], {})),
    "resume changed option": (2, ["--epochs", "cannot change"],
                              lambda f: ("train.py", ["--resume", f.tiny.last, "--epochs", "5"], {})),
    "evaluate batch size 0": (2, ["--batch-size", "positive"], evaluate(best, "--batch-size", "0")),
    "evaluate test subset > data": (2, ["--test-subset 10001", "10,000"],
                                    evaluate(best, "--test-subset", "10001")),
    # data
    "data missing": (1, ["CIFAR-10 not found", "nowhere"], train_(data=lambda f: f.nowhere)),
    "data missing (evaluate)": (1, ["CIFAR-10 not found"], lambda f: evaluate(best, "--data-dir", f.nowhere)(f)),
    "data file missing": (1, ["data_batch_5.bin"], train_(data=lambda f: f.lacking)),
    "data wrong md5": (1, ["data_batch_3.bin", "md5"], train_(data=lambda f: f.bad_md5)),
    "data truncated": (1, ["test_batch.bin", "truncated"], train_(data=lambda f: f.truncated)),
    "download offline": (1, ["could not download", "offline"], offline),
    # weights
    "weights download offline": (1, ["could not download", "ResNet-50", "offline"], weights_offline),
    "weights missing": (1, ["weights file", "does not exist"], weights(missing)),
    "weights truncated": (1, ["weights file", "truncated"], weights(lambda f: f.w_truncated)),
    "weights not pytorch": (1, ["weights file", "not a PyTorch file"], weights(lambda f: f.text)),
    "weights not a state dict": (1, ["not a state_dict"], weights(lambda f: f.w_list)),
    "weights wrong shapes": (1, ["do not fit", "size mismatch", "conv1.weight"], weights(lambda f: f.w_shapes)),
    # checkpoints, for evaluate.py and --resume
    **{f"{cmd} checkpoint {what}": (1, words, run(path)) for cmd, run in (("evaluate", evaluate), ("resume", resume))
       for what, words, path in (
           ("missing", ["checkpoint", "does not exist"], missing),
           ("truncated", ["checkpoint", "truncated"], lambda f: f.c_truncated),
           ("not pytorch", ["checkpoint", "not a PyTorch file"], lambda f: f.text),
           ("a bare state dict", ["not a checkpoint of this project"], lambda f: f.c_state_dict),
           ("of another model", ["does not fit the resnet network"], lambda f: f.c_other_model),
           ("with DDP's module. keys", ["does not fit the sample_resnet network", "module."], lambda f: f.c_ddp),
           ("of another format", ["not a checkpoint of this project"], lambda f: f.c_old),
       )},
    # images
    "image missing": (1, ["does not exist", "nope.png"], evaluate(best, "--images", "nope.png")),
    "image not an image": (1, ["not an image", "notes.txt"], lambda f: evaluate(best, "--images", f.text)(f)),
    "image truncated": (1, ["not an image", "i_trunc.png"], lambda f: evaluate(best, "--images", f.i_truncated)(f)),
    "image is a folder": (1, ["not an image"], lambda f: evaluate(best, "--images", str(f.dir))(f)),
}
BAD_INPUT["cuda unavailable"] = (2, ["--device cuda", "no CUDA"], train_("--device", "cuda"))  # the CPU pinned


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_clear_line(case, bad, cli):
    code, words, command = BAD_INPUT[case]
    script, argv, env = command(bad)
    start_time = time.time()
    res = cli(script, *argv, env=env)
    assert_one_line_error(res, code, *words)
    assert time.time() - start_time < 60  # fails fast (the offline download above all)


def test_fork_server_matches_a_real_process(bad, cli):
    """The fork server reports what a fresh interpreter reports (exit code, stdout, stderr)."""
    for case in ("unknown model", "evaluate checkpoint truncated"):
        script, argv, env = BAD_INPUT[case][2](bad)
        real, forked = run_script(script, *argv, env=dict(ENV, **env)), cli(script, *argv, env=env)
        assert (real.returncode, real.stdout, real.stderr) == (forked.returncode, forked.stdout, forked.stderr)


# ----------------------------------------------------------------------------------------------
# Security: checkpoints and weights are data, never code


def test_every_torch_load_is_weights_only():
    import ast
    calls, sources = [], []
    for dirpath, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        sources += [os.path.join(dirpath, f) for f in files if f.endswith(".py")]
    for path in sources:
        text = open(path).read()
        tree, lines = ast.parse(text), text.splitlines()
        if os.path.basename(os.path.dirname(path)) != "tests":  # tests may read pickles they wrote
            names = {f"{n.value.id}.{n.attr}" for n in ast.walk(tree)
                     if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
            assert not names & {"pickle.load", "pickle.loads", "jit.load"}, path
            for call in ast.walk(tree):  # np.load only with pickles refused, said explicitly
                if isinstance(call, ast.Call) and ast.unparse(call.func) == "np.load":
                    kw = {k.arg: k.value for k in call.keywords}
                    assert isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False, \
                        f"{path}:{call.lineno}: np.load without allow_pickle=False"
        loads = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "load"
                 and isinstance(n.value, ast.Name) and n.value.id == "torch"]
        called = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
        for attr in loads:
            where = f"{os.path.relpath(path, ROOT)}:{attr.lineno}"
            assert id(attr) in called, f"{where}: torch.load passed around, not called"
            if "unsafe on purpose" in lines[attr.lineno - 1]:
                continue
            kw = {k.arg: k.value for k in called[id(attr)].keywords}
            calls.append((where, isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True))
        assert not any(isinstance(n, ast.ImportFrom) and n.module == "torch" and "load" in [a.name for a in n.names]
                       for n in ast.walk(tree)), path
    assert any(w.startswith("torchfile.py:") for w, _ in calls)  # the scan sees the one real loader
    assert [w for w, ok in calls if not ok] == []


class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="session")
def evil(tmp_path_factory, tiny_run):
    import pickle
    d = tmp_path_factory.mktemp("evil")
    ckpt = load(tiny_run.best)
    e = type("Evil", (), {})()
    e.marker = d / "pwned"
    e.ckpt = str(d / "evil.pth")
    torch.save(dict(ckpt, args=dict(ckpt["args"], note=Payload(f"touch {e.marker}"))), e.ckpt)
    e.weights = str(d / "evil_weights.pth")
    torch.save({"conv1.weight": Payload(f"touch {e.marker}")}, e.weights)
    e.torch_home = d / "torch_home"  # a planted file where torchvision caches its weights
    import models
    url = models.TORCHVISION_WEIGHTS["imagenet"].url
    cache = e.torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save({"conv1.weight": Payload(f"touch {e.marker}")}, cache / os.path.basename(url))
    e.raw = str(d / "evil.pkl")
    with open(e.raw, "wb") as f:
        pickle.dump({"state_dict": Payload(f"touch {e.marker}")}, f)
    # the payload is live: an unsafe load runs it
    proof = d / "proof"
    torch.save(Payload(f"touch {proof}"), d / "proof.pth")
    torch.load(d / "proof.pth", weights_only=False)  # unsafe on purpose: shows the payload works
    assert proof.exists()
    return e


@pytest.mark.parametrize("case", ["evaluate", "resume", "weights", "torchvision cache", "raw pickle"])
def test_code_in_a_checkpoint_never_runs(case, evil, cifar_root, cli, tmp_path):
    script, argv, words = {
        "torchvision cache": ("train.py", [*TINY, "--model", "resnet", "--weights", "imagenet", "--out", tmp_path],
                              ["refused", "weights_only=True", "delete it"]),
        "evaluate": ("evaluate.py", [evil.ckpt], ["refused", "weights_only=True", "posix.system"]),
        "resume": ("train.py", ["--resume", evil.ckpt], ["refused", "weights_only=True", "posix.system"]),
        "weights": ("train.py", [*TINY, "--model", "resnet", "--weights", evil.weights, "--out", tmp_path],
                    ["weights file", "refused", "posix.system"]),
        "raw pickle": ("evaluate.py", [evil.raw], ["not a PyTorch file"]),
    }[case]
    res = cli(script, *argv, "--data-dir", cifar_root, env=dict(OFFLINE, TORCH_HOME=str(evil.torch_home)))
    assert not evil.marker.exists(), "the checkpoint's code ran"
    assert_one_line_error(res, 1, *words)


# ----------------------------------------------------------------------------------------------
# Issue 14: every phase honours a stop signal; logs that cannot be written; options on resume


def signal_in(tmp_path, target, nth=1):
    """A driver whose ``target`` (module.function) sends this process SIGINT at its ``nth`` call,
    then runs as usual: a ^C arriving in that phase."""
    module, name = target.split(".")
    return driver(tmp_path, f"""
        import signal, {module}
        real, calls = {module}.{name}, []
        def interrupted(*a, **k):
            calls.append(1)
            if len(calls) == {nth}:
                os.kill(os.getpid(), signal.SIGINT)
            return real(*a, **k)
        {module}.{name} = interrupted
    """)


def test_ctrl_c_while_loading_data_stops_with_one_line_and_writes_nothing(tmp_path, cifar_root, cli):
    run = Run(str(tmp_path), "load")
    res = cli(signal_in(tmp_path, "data.get_loaders"), *run.args("--data-dir", cifar_root))
    assert_one_line_error(res, 130, "stopped by SIGINT while loading the data")
    assert not os.path.exists(run.last) and not os.path.exists(run.best)


def test_ctrl_c_during_validation_saves_and_resumes_bit_identical(tmp_path, tiny_run, cifar_root, cli):
    run = Run(str(tmp_path), "val")
    res = cli(signal_in(tmp_path, "engine.evaluate", nth=2), *run.args("--data-dir", cifar_root))  # epoch 2's
    assert res.returncode == 130, res.stderr
    assert "during validation after epoch 2" in res.stdout and "Traceback" not in res.stderr
    ckpt = load(run.last)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 6)  # epoch 2's steps all done, its validation not
    res = cli("train.py", "--resume", run.last)  # no --data-dir: the run's own
    assert res.returncode == 0, res.stderr
    assert_same_weights(run.last, tiny_run.last)
    assert_same_weights(run.best, tiny_run.best)
    # the resumed process ran no step of epoch 2: no images/s for it (not its 192 images over ~0 s)
    rows = [r.split(",") for r in open(os.path.join(run.log_dir, "val.csv")).read().splitlines()[1:]]
    assert [r[0] for r in rows] == ["1", "2"] and float(rows[0][7]) > 0 and rows[1][7] == ""
    assert printed_test_acc(res.stdout) == printed_test_acc(tiny_run.stdout)


def test_ctrl_c_during_the_final_test_stops_with_one_line(tmp_path, tiny_run, cifar_root, cli):
    run = Run(str(tmp_path), "test")
    res = cli(signal_in(tmp_path, "engine.evaluate", nth=3), *run.args("--data-dir", cifar_root))
    assert_one_line_error(res, 130, "stopped by SIGINT during the final test", "evaluate.py")
    assert_same_weights(run.last, tiny_run.last)  # every checkpoint complete
    assert "Test Acc" not in res.stdout


@pytest.mark.parametrize("which", ["csv", "log"])
def test_a_full_disk_for_the_logs_is_one_line_and_keeps_checkpoints(which, tmp_path, cifar_root, cli):
    run = Run(str(tmp_path), "full")
    assert cli("train.py", *run.args("--data-dir", cifar_root, "--stop-after", "1")).returncode == 0
    before = {p: sha(p) for p in (run.last, run.best)}
    path = os.path.join(run.log_dir, f"full.{which}")
    os.remove(path)
    os.symlink("/dev/full", path)  # every write: ENOSPC
    res = cli("train.py", "--resume", run.last)
    assert_one_line_error(res, 1, "could not write", "No space left on device", "checkpoints are intact")
    assert {p: sha(p) for p in before} == before


def test_abbreviated_options_are_refused(tmp_path, cifar_root, cli):
    run = Run(str(tmp_path), "abbrev")
    res = cli("train.py", *run.args("--data-dir", cifar_root), "--epoch", "20")
    assert_one_line_error(res, 2, "unrecognized arguments: --epoch")
    res = cli("evaluate.py", "x.pth", "--image", "a.png")
    assert_one_line_error(res, 2, "unrecognized arguments")


def test_resume_keeps_the_runs_own_options_unless_given(tmp_path, half_run, cifar_root, cli):
    """--data-dir and --no-download of the run, not the defaults (which would download into cifar/)."""
    run = half_run.copy(tmp_path)
    empty = tmp_path / "cwd"
    empty.mkdir()
    res = cli("train.py", "--resume", run.last, cwd=empty, env={"CIFAR10_ROOT": ""})
    assert res.returncode == 0, res.stderr
    assert not os.path.exists(empty / "cifar")
    other = tmp_path / "elsewhere"
    res = cli("train.py", "--resume", run.last, "--data-dir", other, cwd=empty)  # given: the new value
    assert_one_line_error(res, 1, str(other))


def test_weights_that_become_non_finite_are_never_saved(tmp_path, cifar_root, cli):
    """The loss of the last step is computed before its update: NaN weights after it must be
    caught by the check before the save, not written as the last good checkpoint."""
    run = Run(str(tmp_path), "nanw")
    poison = driver(tmp_path, """
        import engine
        real, calls = engine.train_step, []
        def step(net, *a, **k):
            loss = real(net, *a, **k)
            calls.append(1)
            if len(calls) == 6:  # the last step of epoch 1
                with torch.no_grad():
                    next(net.parameters()).fill_(float("nan"))
            return loss
        engine.train_step = step
    """)
    res = cli(poison, *run.args("--data-dir", cifar_root))
    assert_one_line_error(res, 1, "non-finite", "epoch 1")
    assert not os.path.exists(run.last) and not os.path.exists(run.best)
