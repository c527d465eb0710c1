"""--tensorboard (issue 20): the event files read back with TensorBoard's own reader: training
points at every loss check (several an epoch), the per-epoch and test scalars, the confusion
matrix, the hyperparameters, and a resumed run that continues the same curves with no gap and
no overlap, also after a kill -9 past its last checkpoint."""
import os
import signal
import time

import pytest

from test_faults import Run, cli, driver, load  # noqa: F401

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

# 2 epochs of 20 steps (batch 32): loss checks at steps 8, 16, 20 of each epoch
ARGS = ["--train-subset", "640", "--tensorboard", "--checkpoint-every", "0"]
TRAIN_STEPS = [8, 16, 20, 28, 36, 40]  # global steps: epoch * 20 + step


def events(run):
    acc = EventAccumulator(os.path.join(run.log_dir, "tensorboard", run.name), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def steps(acc, tag):
    return [e.step for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def whole(tmp_path_factory, cifar_root, cli):
    run = Run(str(tmp_path_factory.mktemp("tb")), "whole")
    res = cli("train.py", *run.args(*ARGS, "--data-dir", cifar_root))
    assert res.returncode == 0, res.stderr
    return run, events(run)


def test_the_curves_the_hyperparameters_and_the_confusion_matrix(whole):
    run, acc = whole
    tags = acc.Tags()
    for tag in ("train/loss", "train/acc", "train/lr", "train/images_per_s"):
        assert steps(acc, tag) == TRAIN_STEPS, tag  # every CHECK_EVERY steps and each epoch's end
    for tag in ("epoch/train_loss", "epoch/train_acc", "epoch/val_loss", "epoch/val_acc"):
        assert steps(acc, tag) == [20, 40], tag
    csv_rows = open(os.path.join(run.log_dir, "whole.csv")).read().splitlines()[1:]
    assert [round(e.value, 4) for e in acc.Scalars("epoch/val_acc")] == [round(float(r.split(",")[4]), 4)
                                                                        for r in csv_rows]
    (test,) = acc.Scalars("test/acc")
    assert test.step == 40 and 0 <= test.value <= 1
    assert [e.value for e in acc.Scalars("hparam/test_acc")] == [test.value]
    assert 0 < acc.Scalars("train/lr")[0].value and acc.Scalars("train/lr")[-1].value < 1e-6  # cosine to 0
    assert tags["images"] == ["test/confusion_matrix"]
    hparams = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams
    start = hparams["_hparams_/session_start_info"]
    for key in (b"model", b"lr", b"batch_size", b"sample_resnet"):
        assert key in start


def test_a_resumed_run_continues_the_curves_without_gap_or_overlap(tmp_path, whole, cifar_root, cli):
    run = Run(str(tmp_path), "halves")
    assert cli("train.py", *run.args(*ARGS, "--data-dir", cifar_root, "--stop-after", "1")).returncode == 0
    assert steps(events(run), "train/loss") == TRAIN_STEPS[:3]
    res = cli("train.py", "--resume", run.last)  # the run's --tensorboard is its own
    assert res.returncode == 0, res.stderr
    acc = events(run)
    assert steps(acc, "train/loss") == TRAIN_STEPS
    assert steps(acc, "epoch/val_acc") == [20, 40]
    # the same training, the same curve (bit-identical resume)
    assert [e.value for e in acc.Scalars("train/loss")] == [e.value for e in whole[1].Scalars("train/loss")]


def test_points_logged_after_the_last_checkpoint_of_a_killed_run_are_replaced(tmp_path, cifar_root, cli):
    """kill -9 after the process logged past its last save (step 16 logged, step 8 saved): the
    resumed run's curve has each step once, the resumed values."""
    run = Run(str(tmp_path), "k9")
    slow = driver(tmp_path, """
        import checkpoints, engine, time
        real_step, real_save = engine.train_step, checkpoints.Checkpointer.save
        def step(*a, **k):
            time.sleep(0.1)
            return real_step(*a, **k)
        def save(self, epoch, step, *a, **k):  # only the save at step 8: steps 9-16 are logged, not saved
            if (epoch, step) == (0, 8):
                return real_save(self, epoch, step, *a, **k)
        engine.train_step, checkpoints.Checkpointer.save = step, save
    """)
    proc = cli.start(slow, *run.args("--data-dir", cifar_root, "--train-subset", "640", "--tensorboard",
                                     "--checkpoint-every", "1e-9"))
    deadline = time.time() + 120
    while time.time() < deadline:
        folder = os.path.join(run.log_dir, "tensorboard", run.name)
        if os.path.exists(run.last) and os.path.isdir(folder) and 16 in steps(events(run), "train/loss"):
            break
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert load(run.last)["step"] == 8
    res = cli("train.py", "--resume", run.last)
    assert res.returncode == 0, res.stderr
    assert steps(events(run), "train/loss") == TRAIN_STEPS  # 16 once: the killed run's point is purged


def test_without_the_package_the_flag_is_one_line(tmp_path, cifar_root, cli):
    from test_faults import assert_one_line_error
    hide = driver(tmp_path, """
        import builtins
        real_import = builtins.__import__
        def no_tensorboard(name, *a, **k):
            if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
                raise ImportError("No module named 'tensorboard'")
            return real_import(name, *a, **k)
        builtins.__import__ = no_tensorboard
    """)
    res = cli(hide, *Run(str(tmp_path), "notb").args("--data-dir", cifar_root, "--tensorboard"))
    assert_one_line_error(res, 2, "--tensorboard needs the tensorboard package", "pip install tensorboard==")
