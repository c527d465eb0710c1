"""Shared fixtures. Real data and weights come from the environment (CI: ../shared):
CIFAR10_ROOT (a folder holding cifar-10-batches-bin or -py) and RESNET50_WEIGHTS (a ResNet-50 file).
Tests that need them skip, saying why, when they are absent."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, torch.get_num_threads()))


def missing(why):
    """Skip, saying why; under CI (CI=true) fail instead: a CI run that skips most of its tests
    because ../shared is missing must not pass."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}, and CI=true: CI must run every test (.ci/run sets both from ../shared)")
    pytest.skip(why)


@pytest.fixture(scope="session")
def cifar_root():
    root = os.environ.get("CIFAR10_ROOT")
    if not root or not os.path.isdir(root):
        missing("CIFAR10_ROOT is not set to a CIFAR-10 folder (CI: ../shared/data)")
    return os.path.abspath(root)  # tests link to it from temporary folders


@pytest.fixture(scope="session")
def weights_path():
    path = os.environ.get("RESNET50_WEIGHTS")
    if not path or not os.path.isfile(path):
        missing("RESNET50_WEIGHTS is not set to a ResNet-50 weights file (CI: ../shared/weights/...)")
    return os.path.abspath(path)


@pytest.fixture(scope="session")
def cifar(cifar_root):
    """(train_x, train_y, test_x, test_y), loaded once per session."""
    import data
    return data.load_cifar10(cifar_root, download=False)


# Every process a test starts computes on the CPU, on any machine: there --device auto would pick
# a GPU (bf16 autocast, cuDNN benchmark), and the tests compare runs bit for bit. The CUDA tests run
# in the pytest process itself, which still sees the GPU (and skip without one).
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


def child_env(*extra):
    """The environment of a process a test starts: this one's, unbuffered, CPU_ONLY, then ``extra``
    (dicts, later ones winning)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **CPU_ONLY)
    for e in extra:
        env.update(e or {})
    return env


def run_script(script, *args, cwd=None, env=None, timeout=600):
    """Run train.py / evaluate.py as a user would, on the CPU; returns CompletedProcess (text, both streams)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd or ROOT,
                          env=child_env(env), capture_output=True, text=True, timeout=timeout)
