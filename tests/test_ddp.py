"""Issue 5, several processes: DistributedDataParallel on the CPU with two gloo processes.

Every rank draws the same global batch and keeps its slice (data.TensorLoader), so one DDP step
must give the gradients of one single-process step on the whole batch, and validation summed over
ranks must count every image exactly once. All processes talk over 127.0.0.1 only.
"""
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import engine
from utils import StopSignals
from conftest import ROOT, child_env, run_script
from models import build_model

WORLD = 2
GLOBAL_BATCH = 16
EVAL_IMAGES, EVAL_BATCH = 1001, 200  # the last batch holds one image: rank 1 gets none of it
ENV = {"OMP_NUM_THREADS": "1"}  # two processes on two cores


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def images(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def model():
    """sample_resnet with BatchNorm on its running statistics (eval mode): no batch statistics,
    so a sample's gradient does not depend on which rank holds the rest of the batch. (PyTorch's
    SyncBatchNorm, the train-mode alternative, has no CPU implementation.)"""
    torch.manual_seed(0)
    net, _ = build_model("sample_resnet")
    for m in net.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def loaders(rank, world):
    x, y = images(4 * GLOBAL_BATCH, seed=1)
    tx, ty = images(EVAL_IMAGES, seed=2)
    return (data.TensorLoader(x, y, GLOBAL_BATCH, 32, True, "cpu", seed=3, rank=rank, world_size=world),
            data.TensorLoader(tx, ty, EVAL_BATCH, 32, False, "cpu", rank=rank, world_size=world))


def step_and_validate(net, wrapped, rank, world):
    """Gradients of one step on the first (augmented) batch, then validation of the same weights."""
    train_loader, test_loader = loaders(rank, world)
    x, y = next(iter(train_loader))
    F.cross_entropy(wrapped(x), y).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    return grads, engine.evaluate(net, test_loader, torch.device("cpu"), contextlib.nullcontext(),
                                  keep_predictions=True)


def _worker(rank, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        net = model()
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        grads, val = step_and_validate(net, ddp, rank, WORLD)
        signals = StopSignals()
        if rank == 1:  # SIGTERM reaches one rank only (its StopSignals handler records it)
            signals.handle(signal.SIGTERM, None)
        # one rank's non-finite loss, and rank 0's checkpoint clock: every rank learns both
        stop, diverged, save_due = signals.requested(torch.device("cpu"), rank == WORLD - 1, rank == 0)
        torch.save({"grads": grads, "val": val, "stop": int(stop), "flags": (diverged, save_due)},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    # fork: the ranks start with everything imported (a spawned interpreter takes ~10 s on 2 busy
    # cores); safe since each sets one thread before any op, as DataLoader workers do
    torch.multiprocessing.start_processes(_worker, args=(free_port(), out), nprocs=WORLD, start_method="fork")
    ranks = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]
    net = model()
    grads, val = step_and_validate(net, net, 0, 1)
    return ranks, {"grads": grads, "val": val}


def test_ranks_get_disjoint_slices_of_the_same_global_batch():
    for k in (0, 1):  # training (shuffled, augmented) and evaluation batches
        single = [(x.clone(), y.clone()) for x, y in loaders(0, 1)[k]]
        parts = [[(x.clone(), y.clone()) for x, y in loaders(r, WORLD)[k]] for r in range(WORLD)]
        assert all(len(p) == len(single) for p in parts)
        for i, (x, y) in enumerate(single):
            for r in range(WORLD):
                assert torch.equal(parts[r][i][0], x[r::WORLD]) and torch.equal(parts[r][i][1], y[r::WORLD])
        # evaluation: every image once, none padded or repeated
        assert sum(len(y) for p in parts for _, y in p) == sum(len(y) for _, y in single)


def test_ddp_step_gradients_equal_a_single_process_step(ddp_results):
    ranks, single = ddp_results
    single_grads = single["grads"]
    for grads in (r["grads"] for r in ranks):
        assert grads.keys() == single_grads.keys()
        for name, g in single_grads.items():
            assert g.abs().sum() > 0, name  # a real gradient
            torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=0, msg=name)


def test_validation_reduced_over_ranks_equals_one_process(ddp_results):
    ranks, single = ddp_results
    loss, acc, confusion, (probs, predicted, labels) = single["val"]
    assert confusion.sum() == EVAL_IMAGES
    assert torch.equal(labels, torch.as_tensor(images(EVAL_IMAGES, seed=2)[1]))  # the loader's order
    for r_loss, r_acc, r_confusion, (r_probs, r_predicted, r_labels) in (r["val"] for r in ranks):
        assert torch.equal(r_confusion, confusion)  # every image counted once, with its prediction
        assert r_acc == acc
        assert r_loss == pytest.approx(loss, rel=1e-6)
        # the per-image predictions gathered from both ranks come back in the loader's order
        assert torch.equal(r_labels, labels)
        torch.testing.assert_close(r_probs, probs, atol=2e-3, rtol=0)
        assert torch.equal(r_predicted, predicted)


def test_a_signal_to_one_rank_stops_every_rank(ddp_results):
    ranks, _ = ddp_results
    assert [r["stop"] for r in ranks] == [signal.SIGTERM] * WORLD  # the same step, the same exit code
    assert [r["flags"] for r in ranks] == [(True, True)] * WORLD


def test_the_copy_of_ctrl_c_torchrun_forwards_does_not_abort_a_rank(monkeypatch):
    """^C reaches each rank from the terminal and again from torchrun's agent; only a user's
    second ^C in a single process means "stop at once" (KeyboardInterrupt, no checkpoint)."""
    signals = StopSignals()
    monkeypatch.setenv("RANK", "0")
    signals.handle(signal.SIGINT, None)
    try:
        signals.handle(signal.SIGINT, None)  # the agent's copy: the rank still stops after its step
    except KeyboardInterrupt:  # caught here: pytest would take it for the user's and stop the session
        pytest.fail("the forwarded ^C aborted the rank before it saved")
    assert signals.received == [signal.SIGINT, signal.SIGINT]
    monkeypatch.delenv("RANK")
    with pytest.raises(KeyboardInterrupt):  # a single process: the user's second ^C
        signals.handle(signal.SIGINT, None)


# ----------------------------------------------------------------------------------------------
# train.py under torchrun

TINY = ["--model", "sample_resnet", "--image-size", "32", "--epochs", "2", "--train-subset", "192",
        "--val-split", "100", "--test-subset", "1001", "--batch-size", "32", "--val-every", "1",
        "--device", "cpu", "--seed", "0", "--no-download"]


def torchrun(*args, **popen):
    """torchrun --nproc_per_node=2 train.py ARGS on 127.0.0.1 (a Popen: stdout piped, text)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", os.path.join(ROOT, "train.py"), *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, env=child_env(ENV), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


@pytest.mark.slow
def test_torchrun_ctrl_c_resume_and_evaluate(tmp_path, cifar_root):
    """^C in the terminal (SIGINT to torchrun and both ranks), --resume under torchrun, then the
    files of exactly one run and a test accuracy that evaluate.py reproduces."""
    out, logs = tmp_path / "ck", tmp_path / "log"
    args = [*TINY, "--data-dir", cifar_root, "--out", out, "--log-dir", logs, "--run-name", "ddp"]
    proc = torchrun(*args, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("  epoch 1/2 step 2/"):
            os.killpg(proc.pid, signal.SIGINT)  # what ^C in the terminal does
            break
    rest, err = proc.communicate(timeout=300)
    stdout = "".join(seen) + rest
    last = out / "ddp" / "last.pth"
    assert f"Resume with: python train.py --resume {out}/ddp/last.pth" in stdout, stdout + err
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["epoch"] in (0, 1) and ckpt["step"] >= 1  # mid-epoch
    assert "KeyboardInterrupt" not in err and "train.py\", line" not in err, err  # no rank crashed

    proc = torchrun("--resume", last, "--data-dir", cifar_root)
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert stdout.count("Test Acc : ") == 1  # rank 0 alone logs
    acc = re.findall(r"Test Acc : ([0-9.]+)", stdout)

    assert sorted(os.listdir(logs)) == ["ddp-confusion.png", "ddp-test.npz", "ddp.csv", "ddp.log", "ddp.png"]
    assert sorted(os.listdir(out)) == ["ddp"] and sorted(os.listdir(out / "ddp")) == ["Sample_ResNet.pth", "last.pth"]
    rows = (logs / "ddp.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["epoch", "1", "2"]  # each epoch once, by one process
    res = run_script("evaluate.py", out / "ddp" / "Sample_ResNet.pth", "--data-dir", cifar_root, "--no-download",
                     env=ENV)
    assert res.returncode == 0, res.stderr
    assert re.findall(r"Test Acc : ([0-9.]+)", res.stdout) == acc
    assert "1001 test images" in res.stdout


@pytest.mark.slow
def test_torchrun_sync_bn_on_cpu_is_refused(tmp_path, cifar_root):
    proc = torchrun(*TINY, "--sync-bn", "--data-dir", cifar_root, "--out", tmp_path, "--log-dir", tmp_path)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert 'train.py", line' not in err, err  # torchrun reports the failure; no rank crashed
    assert err.count("train.py: error: --sync-bn needs CUDA") == WORLD, err  # each rank, one line
    assert "exitcode  : 2" in err  # a usage error


@pytest.mark.slow
def test_no_rank_reads_a_file_only_rank_0_wrote(tmp_path, cifar_root):
    """Two nodes without a shared filesystem: rank 1's --out is a folder rank 0 never writes (the
    driver changes it on rank 1 only). The final test needs the best weights on every rank; they
    come from memory, not from rank 0's file."""
    driver = tmp_path / "driver.py"
    other = tmp_path / "rank1-sees-nothing"
    driver.write_text(f"import os, runpy, sys\nsys.path.insert(0, {ROOT!r})\n"
                      f"if os.environ['RANK'] == '1':\n    sys.argv[sys.argv.index('--out') + 1] = {str(other)!r}\n"
                      f"sys.argv[0] = {os.path.join(ROOT, 'train.py')!r}\n"
                      f"runpy.run_path(sys.argv[0], run_name='__main__')\n")
    out = tmp_path / "ck"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(driver), *TINY, "--data-dir", cifar_root, "--out", out,
           "--log-dir", tmp_path / "log", "--run-name", "nodes"]
    proc = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=child_env(ENV),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Test Acc : ") == 1
    assert sorted(os.listdir(out / "nodes")) == ["Sample_ResNet.pth", "last.pth"]
    assert not other.exists() or not any(other.rglob("*"))  # rank 1 wrote nothing and read nothing there
