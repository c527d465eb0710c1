"""Small shared pieces of the commands: the one-line user error, the command-line helpers, stop
signals, the run's device context, the CPU allocator setting, versions, torch.distributed."""
import argparse
import contextlib
import ctypes
import math
import os
import platform
import signal
import sys
from dataclasses import dataclass

import torch


class UserError(Exception):
    """A problem with the user's input or files: reported as one line, exit code 1 (2 for usage)."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(e):
    """An exception's message on one line (its first), or its type's name when it has none."""
    lines = [" ".join(line.split()) for line in str(e).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(e).__name__


def run_cli(main):
    """Call ``main()``; a UserError becomes one line on stderr and a non-zero exit."""
    try:
        return main()
    except UserError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # ^C before training starts, or a second ^C: nothing to save
        print(f"{os.path.basename(sys.argv[0])}: interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors and no abbreviated options (``--epoch`` is not ``--epochs``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):  # one line, not the usage wall
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def given(self, argv):
        """The dests of the options written on the command line ``argv``."""
        flags = {tok.split("=", 1)[0] for tok in argv if tok.startswith("--")}
        return {a.dest for a in self._actions if flags & set(a.option_strings)}


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got {text}")
        return value
    return parse


def non_negative_int(text):
    return 0 if text == "0" else positive(int)(text)


def non_negative(kind):
    def parse(text):
        try:
            if kind(text) == 0:
                return kind(0)
        except ValueError:
            pass
        return positive(kind)(text)
    return parse


class StopSignals:
    """SIGINT/SIGTERM as requests to stop at the next safe point (after a training step), not at once.

    ``install`` makes this object the handler; the loop asks ``requested`` (all ranks agree).
    A second ^C stops at once. Not under torchrun: its agent forwards the ^C it got, so every rank
    sees the user's one ^C twice; the agent itself kills the ranks if they take too long."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received = []

    def install(self):
        for s in self.SIGNALS:
            signal.signal(s, self.handle)

    def handle(self, signum, frame):
        if self.received and "RANK" not in os.environ:
            raise KeyboardInterrupt
        self.received.append(signum)

    def exit_if_requested(self, what):
        """Outside the training loop there is nothing to save: stop with one line and 128 + signal."""
        if self.received:
            signum = self.received[0]
            raise UserError(f"stopped by {signal.Signals(signum).name} {what}", exit_code=128 + signum)

    def requested(self, device, *flags):
        """-> (the signal any rank got (0: none), then for each of ``flags`` whether any rank raised
        it): one all_reduce, so all ranks stop at the same step, also those that missed the signal."""
        got = all_reduce_sum([float(s in self.received) for s in self.SIGNALS] + [float(f) for f in flags], device)
        return (next((s for s, n in zip(self.SIGNALS, got) if n), 0), *[n > 0 for n in got[len(self.SIGNALS):]])


# ----------------------------------------------------------------------------------------------
# Files, the allocator, versions


def read_text(path):
    """A text file's content, or "" when it cannot be read (a log that is not there yet)."""
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def atomic_write_text(path, text):
    """Write a small text file so that readers see the old or the new content, never a mix."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path):
    """A temporary name beside ``path`` to write to (hidden, the extension kept: some writers want
    it): renamed over ``path`` when the block ends without an error, removed otherwise, so a
    reader sees the old file or the whole new one, never half of one."""
    stem, ext = os.path.splitext(os.path.basename(path))
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{stem}.tmp{os.getpid()}{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def tune_cpu_allocator():
    """Keep freed memory in the process instead of handing it back to the OS.

    glibc serves every allocation above 32 MB (ResNet-50's activations at 224 px) with its own
    mmap and unmaps it on free, so each forward pass faults hundreds of MB back in: on the 2-core
    CPUs 40% of ResNet-50 inference time went to page faults (5.7 -> 12 images/s once off, NCHW ->
    channels_last included; benchmarks/extract_bench.py). No mmap'd chunks and no trimming keep
    the heap's pages mapped for reuse. The process's peak memory is what it was; only its return
    to the OS waits for exit. Linux/glibc only; elsewhere nothing changes."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no allocation gets its own mmap
        libc.mallopt(-1, ctypes.c_int(2**31 - 1))  # M_TRIM_THRESHOLD: never give the heap top back
    except (OSError, AttributeError):
        pass


def versions():
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(__import__("torchvision").__version__)}


# ----------------------------------------------------------------------------------------------
# torch.distributed (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE)


@dataclass
class Runtime:
    """Where and how this process computes, chosen once (nanoGPT's style): passed, never global."""
    device: torch.device
    autocast: object  # a context manager: bf16 autocast, or nothing (float32)
    rank: int = 0
    world_size: int = 1
    precision: str = "fp32"  # what ``autocast`` does: "bf16" or "fp32"

    @property
    def master(self):  # rank 0 alone writes logs and checkpoints
        return self.rank == 0

    @property
    def cuda(self):
        return self.device.type == "cuda"


def cpu_has_amx():
    """True on a CPU with AMX tiles (Intel Sapphire Rapids and later), where oneDNN runs bfloat16
    convolutions ~2x faster than float32 (ResNet-50 training 9.5 -> 20.5 img/s on 2 cores)."""
    return _cpu_probe("_is_amx_tile_supported")


def cpu_bf16_is_fast():
    """True where bf16 autocast trains faster than float32 on this CPU, as measured by
    benchmarks/cpu_speed.py (results/speed-cpu-*.md, 2 cores, 224 px, batch 128):
    - an Intel Xeon with AMX: ResNet-50 2.2x, sample_resnet 1.5x;
    - an AMD EPYC Zen 4 (avx512_bf16, no AMX): ResNet-50 2.15x, sample_resnet 1.65x;
    - not an Intel Xeon with avx512_bf16 but no AMX (bf16 0.8x: oneDNN keeps its bf16 convolutions
      for AMX there), nor an AVX2-only CPU."""
    return cpu_has_amx() or (cpu_vendor() == "AuthenticAMD" and cpu_has_avx512_bf16())


def cpu_has_avx512_bf16():
    """True on a CPU with the AVX-512 bfloat16 instructions (Intel Cooper Lake and later, AMD Zen 4)."""
    return _cpu_probe("_is_avx512_bf16_supported")


def cpuinfo_fields(text=None):
    """The first processor's fields of /proc/cpuinfo (or of ``text``, its contents): {} where there is
    none (not Linux)."""
    fields = {}
    for line in (read_text("/proc/cpuinfo") if text is None else text).splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:  # the blank line after the first processor
                break
            continue
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_vendor():
    """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD"), or "" where there is none."""
    return cpuinfo_fields().get("vendor_id", "")


def cpu_name(fields=None):
    """The CPU's model name with its family and model numbers, e.g. "Intel(R) Xeon(R) Processor
    [family 6 model 207]". A virtual machine often shows only that generic name, and two such 2-core
    Xeons with AMX ran the same benchmark 1.6x apart (benchmarks/cpu_speed.py, sample_resnet's bf16
    whole-batch step: 48.1 img/s on 2026-12-02, 30.6 on 2026-12-06; results/speed-cpu-2026120[26]-*):
    the numbers tell them apart."""
    fields = cpuinfo_fields() if fields is None else fields
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if fields.get("cpu family") and fields.get("model"):
        name += f" [family {fields['cpu family']} model {fields['model']}]"
    return name


def _cpu_probe(name):
    probe = getattr(torch.cpu, name, None)  # private, so guarded
    try:
        return bool(probe and probe())
    except Exception:
        return False


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision, cuda):
    """--precision auto|fp32|bf16 -> "bf16" or "fp32". auto: bf16 on CUDA, float32 on a CPU: a CPU
    run is bit-reproducible and the tests compare it bit for bit; ask for bf16 where
    cpu_bf16_is_fast()."""
    return ("bf16" if cuda else "fp32") if precision == "auto" else precision


def setup_runtime(device_arg="auto", distributed=True, precision="auto"):
    """--device auto|cpu|cuda, --precision -> Runtime; joins torchrun's process group when launched by it."""
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available", exit_code=2)
    cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    rank, world_size = 0, 1
    if distributed:
        rank, _, world_size, device = setup_distributed(device)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    precision = resolve_precision(precision, cuda)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    return Runtime(device, autocast, rank, world_size, precision)


def setup_distributed(device):
    """-> (rank, local_rank, world_size, device). A single process when not under torchrun."""
    if "RANK" not in os.environ:
        return 0, 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, local_rank, world_size, device


def teardown_distributed():
    """Leave torchrun's process group at the end of a run (torch >= 2.4 warns at exit otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def all_reduce_sum(values, device):
    """Sum a list of numbers over all ranks (identity without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (identity without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
