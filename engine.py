"""What a training run is made of, shared by train.py and the benchmarks: per-model hyperparameters,
the optimiser and its schedule (restored on resume: ``make_optimisation``), the training step
(whole batches or micro-batches), and evaluation.

Nothing here waits for the device. The step and evaluation keep their sums (loss, correct
predictions, images, the confusion matrix) in device tensors; the host reads them only where a
number is shown or checked (``Meter.read``, the end of ``evaluate``), so a GPU is never stalled
between steps by a ``.item()``.
"""
import contextlib
import math

import torch
import torch.nn.functional as F

from utils import all_reduce_sum

# ----------------------------------------------------------------------------------------------
# Hyperparameters: one place. Per-model defaults were picked on the validation split (docs/
# training.md, "Training defaults"). The ImageNet starts are fine-tuned with a 10x smaller learning rate than
# the from-scratch sample_resnet; the frozen models train only their head, for which AdamW needs
# no tuning of the lr to the (un-normalised) scale of the pooled ResNet features.
MODEL_DEFAULTS = {
    "sample_resnet": dict(optimizer="sgd", lr=0.1, weight_decay=5e-4),
    "resnet": dict(optimizer="adamw", lr=1e-3, weight_decay=1e-4),
    "resnet_att": dict(optimizer="adamw", lr=1e-3, weight_decay=5e-2),
    "resnet_scratch": dict(optimizer="sgd", lr=0.01, weight_decay=5e-4),
    "resnet_att_scratch": dict(optimizer="sgd", lr=0.01, weight_decay=5e-4),
}
BATCH_SIZE = 128  # the global batch (split over ranks under torchrun)
MOMENTUM = 0.9  # SGD, with Nesterov
WARMUP_EPOCHS = 1  # linear warmup from 0, then cosine decay to 0, stepped every batch
EVAL_BATCH_FACTOR = 2  # evaluation stores no activations: a larger batch fits


def fill_model_defaults(args):
    """A new run's optimiser, lr and weight decay: the model's MODEL_DEFAULTS where not given."""
    for key, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def make_optimizer(name, lr, weight_decay, params, fused=False):
    fused = {"fused": True} if fused else {}
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, nesterov=True, weight_decay=weight_decay, **fused)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fused)


def make_scheduler(optimizer, steps_per_epoch, epochs):
    """Linear warmup over WARMUP_EPOCHS (at most a tenth of the run), then cosine to zero."""
    total = steps_per_epoch * epochs
    warmup = min(WARMUP_EPOCHS * steps_per_epoch, total // 10)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimisation(args, model, steps_per_epoch, ckpt, fused=False):
    """-> (optimizer, scheduler, criterion, (epoch, step, best val acc, meter sums)) over the model's
    trainable parameters, from train.py's ``args``; resuming, all of it and the CPU RNG as the
    checkpoint ``ckpt`` left them."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(args.optimizer, args.lr, args.weight_decay, params, fused=fused)
    scheduler = make_scheduler(optimizer, steps_per_epoch, args.epochs)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    if not ckpt:
        return optimizer, scheduler, criterion, (0, 0, 0.0, {})
    optimizer.load_state_dict(ckpt["optimizer"])
    for group in optimizer.param_groups:  # the saved flag is the saving machine's: a CPU run resumed on
        group["fused"] = True if fused else None  # CUDA gets the fused kernels, and the other way round
    scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng_state"])
    return optimizer, scheduler, criterion, (ckpt["epoch"], ckpt["step"], ckpt["best_val_acc"], ckpt["meter"])


# ----------------------------------------------------------------------------------------------
# Training


class Meter:
    """Running sums of one epoch's training loss and correct predictions, kept on the device, and
    its image count, known on the host. ``local`` and ``read`` are where they reach the host."""

    def __init__(self, device, loss=0.0, correct=0, count=0):
        self.device, self.count = device, int(count)
        self.sums = torch.tensor([float(loss), float(correct)], dtype=torch.float64, device=device)

    def update(self, loss, logits, y):
        """Add a batch's mean ``loss`` and its predictions: device ops only, no host sync."""
        self.sums += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double()])
        self.count += len(y)

    def local(self):
        """{loss, correct, count} sums of this process (a host sync): what a checkpoint records."""
        loss, correct = self.sums.tolist()
        return {"loss": loss, "correct": int(correct), "count": self.count}

    def local_read(self):
        """(mean loss, accuracy, images) of this process alone (a host sync, no collective)."""
        loss, correct = self.sums.tolist()
        return loss / max(self.count, 1), correct / max(self.count, 1), self.count

    def read(self):
        """(mean loss, accuracy, images) over all ranks (a host sync). The mean loss is NaN or
        infinite as soon as one step's loss was."""
        loss, correct, count = all_reduce_sum(self.sums.tolist() + [self.count], self.device)
        return loss / max(count, 1), correct / max(count, 1), int(count)


def train_step(net, x, y, criterion, optimizer, scheduler, autocast, meter, micro_batch=None):
    """One optimisation step on the batch (x, y). It issues no host synchronisation: the loss and
    the predictions go into ``meter`` on the device, and their finiteness is checked where the
    meter is read. -> the batch's mean loss (a device tensor).

    ``micro_batch``: the batch goes through the network in chunks of that many images whose
    gradients add up before the one optimiser step (gradient accumulation): the same global batch
    and learning rate in less memory, and on a CPU often faster (smaller working set). BatchNorm
    then normalises over each chunk, as it would over each GPU's share under DDP."""
    optimizer.zero_grad(set_to_none=True)
    if not micro_batch or micro_batch >= len(y):
        with autocast:
            logits = net(x)
            loss = criterion(logits.float(), y)
        loss.backward()
        meter.update(loss, logits, y)
        total = loss.detach()
    else:
        chunks = list(zip(x.split(micro_batch), y.split(micro_batch)))
        total = 0
        for i, (xc, yc) in enumerate(chunks):
            # under DDP the gradients are all-reduced once, with the last chunk's backward
            last = i == len(chunks) - 1
            with contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync():
                with autocast:
                    logits = net(xc)
                    loss = criterion(logits.float(), yc)
                (loss * (len(yc) / len(y))).backward()
            meter.update(loss, logits, yc)
            total = total + loss.detach() * (len(yc) / len(y))
    optimizer.step()
    scheduler.step()
    return total


def broadcast_buffers(module):
    """Rank 0's buffers (BatchNorm's running statistics) on every rank. DDP sends them at the start
    of each forward, but the last step's forward then updates each rank's copy from its own share
    of the batch: without this, validation and the final test would run each rank's shard with
    slightly different statistics than the checkpoint holds (rank 0's)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)


def parameters_finite(module):
    """True when every parameter and buffer is finite: one reduction, one host sync (before a save)."""
    tensors = [t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]
    if not tensors:
        return True
    return bool(torch.stack([t.detach().float().sum() for t in tensors]).isfinite().all())


# ----------------------------------------------------------------------------------------------
# Evaluation


class Stopped(Exception):
    """A stop signal arrived during evaluation: args[0] is its number."""

    @property
    def signum(self):
        return self.args[0]


def output_classes(net):
    """The number of classes a network outputs: the out_features of its last Linear layer (every
    model here ends in one; DDP- and compile-wrapped networks included)."""
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError("the network has no Linear layer: pass num_classes")
    return linears[-1].out_features


def evaluate(net, loader, device, autocast, num_classes=None, stop=None, keep_predictions=False, progress=None):
    """(mean loss, accuracy, confusion matrix [true, predicted] on the CPU) over every sample of
    ``loader`` exactly once. Loss and confusion accumulate on the device (a scatter-add, which
    unlike ``bincount`` needs no host sync on CUDA); under DDP each rank holds a disjoint share and
    the sums are reduced. ``stop`` (utils.StopSignals): raise Stopped before the next batch once
    a stop signal arrived. ``keep_predictions``: a fourth item, (probabilities float16 (N, classes),
    predicted classes (N,), labels (N,)) on the CPU, in the loader's order over all ranks (what
    report.save_predictions writes). ``progress``: called with each batch's image count (a
    report.Progress's ``update``). ``num_classes``: by default the network's (``output_classes``)."""
    num_classes = num_classes or output_classes(net)
    net.eval()
    kept = []  # per batch: (softmax probabilities, predicted classes, labels), on the device until the end
    with torch.inference_mode():
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
        for x, y in loader:
            if stop is not None and stop.received:  # a Python list: no sync
                raise Stopped(stop.received[0])
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast:
                logits = net(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            confusion.index_add_(0, y * num_classes + logits.argmax(1), torch.ones_like(y))
            if keep_predictions:
                kept.append((logits.softmax(1).half(), logits.argmax(1), y.clone()))
            if progress is not None:
                progress(len(y))
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(confusion)
            torch.distributed.all_reduce(loss_sum)
        confusion = confusion.view(num_classes, num_classes).cpu()
    confusion = confusion.clone()  # a normal tensor: the caller may change it in place
    count = int(confusion.sum())
    result = (float(loss_sum) / max(count, 1), int(confusion.trace()) / max(count, 1), confusion)
    if keep_predictions:
        result += (gather_in_order([tuple(t.cpu() for t in batch) for batch in kept], num_classes),)
    return result


def gather_in_order(batches, num_classes):
    """This rank's (probabilities, predictions, labels) per batch -> the same three of every rank,
    in the loader's order. Every loader here gives rank r the images [r::world_size] of each
    global batch, so global batch b is the ranks' b-th shares interleaved back."""
    empty = (torch.zeros(0, num_classes, dtype=torch.float16), torch.zeros(0, dtype=torch.long),
             torch.zeros(0, dtype=torch.long))
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tuple(torch.cat([e] + [b[k] for b in batches]) for k, e in enumerate(empty))
    world = torch.distributed.get_world_size()
    shares = [None] * world
    torch.distributed.all_gather_object(shares, batches)
    gathered = []
    for b in range(len(shares[0])):  # every rank has every batch (a share may be empty)
        n = sum(len(share[b][2]) for share in shares)
        whole = tuple(e.new_empty((n, *e.shape[1:])) for e in empty)
        for r, share in enumerate(shares):
            for k, part in enumerate(share[b]):
                whole[k][r::world] = part
        gathered.append(whole)
    return tuple(torch.cat([e] + [g[k] for g in gathered]) for k, e in enumerate(empty))
