"""See what a checkpoint's network looks at: Grad-CAM and the CBAM attention maps, image by image.

    python explain.py checkpoints/<run>/Sample_ResNet.pth --out maps.png             # 6 test images
    python explain.py checkpoints/<run>/ResNet_att.pth --test 8 --seed 1 --out maps.png
    python explain.py checkpoints/<run>/ResNet_att.pth --images cat.png dog.jpg --out maps.png

One row per image: the input as the network sees it (resized as in evaluation), the Grad-CAM heat
map of the predicted class over the last convolutional feature map before pooling, and, for the
models with CBAM (sample_resnet, resnet_att, resnet_att_scratch), the spatial attention Ms of each
CBAM block; a last row shows each block's channel attention Mc as a histogram over those images.
Heat maps are upsampled bilinearly to the input's size; Grad-CAM is scaled to its maximum, each Ms
to its own range (printed above it). docs/explain.md: examples, and how the maps are computed.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import checkpoints
import data
import report
from attention_model import CBAM, AttentionModule, ResAttention, SampleResNet
from models import ResNet50Classifier
from utils import Parser, UserError, positive, run_cli, setup_runtime

MAX_ROWS = 50  # a taller figure is unreadable


def parse_args(argv):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--images", nargs="+", metavar="FILE", help="image files (any size; resized as in evaluation)")
    which.add_argument("--test", type=positive(int), metavar="N", help="N test images (default: 6)")
    p.add_argument("--seed", type=int, default=0, help="which test images (default: 0)")
    p.add_argument("--out", required=True, metavar="PNG", help="the figure")
    p.add_argument("--data-dir", help="the test images: CIFAR-10 ($CIFAR10_ROOT or cifar) for a CIFAR-10 "
                                      "checkpoint, else the image folder it was trained on")
    p.add_argument("--no-download", action="store_true", help="never download CIFAR-10")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = p.parse_args(argv)
    if not args.out.lower().endswith(".png"):
        raise UserError(f"--out {args.out}: the figure is a PNG file, name it *.png", exit_code=2)
    n = len(args.images) if args.images else args.test or 6
    if n > MAX_ROWS:
        raise UserError(f"{n} images asked for; at most {MAX_ROWS} rows fit a readable figure", exit_code=2)
    args.test = None if args.images else n
    return args


# ----------------------------------------------------------------------------------------------
# Grad-CAM and the attention maps


def target_layer(model):
    """The module whose output is the network's last convolutional feature map before pooling."""
    if isinstance(model, SampleResNet):
        return [m for m in model.features if isinstance(m, ResAttention)][-1]
    if isinstance(model, ResNet50Classifier):  # head.body: 1x1 conv + ResAttention (resnet_att*), or empty
        return model.head.body if len(model.head.body) else model.backbone.layer4
    raise UserError(f"no Grad-CAM layer is known for a {type(model).__name__}; pass layer=")


def gradcam(model, x, class_idx, layer=None):
    """Grad-CAM (Selvaraju et al. 2017): (B, h, w) maps in [0, 1] of the classes ``class_idx`` (an int
    or one per image) over the output A (B, C, h, w) of ``layer`` (default ``target_layer(model)``):
    relu(sum_c mean_hw(d score / dA_c) * A_c), divided by its maximum (all zeros where it is 0).

    A forward hook swaps A for a detached copy that requires grad: the gradient d score / dA then
    exists even where the layers before it ran without autograd (a frozen backbone runs under
    torch.set_grad_enabled(False)), and the backward pass stops there. ``model`` must be in eval
    mode (BatchNorm in training mode would mix the images of a batch)."""
    layer = target_layer(model) if layer is None else layer
    saved = []

    def swap(module, inputs, output):
        saved.append(output.detach().requires_grad_())
        with torch.enable_grad():  # the clone must be on the graph, also inside a no-grad region
            return saved[-1].clone()  # a later in-place op (ReLU(inplace=True)) must not touch the leaf

    handle = layer.register_forward_hook(swap)
    try:
        with torch.enable_grad():
            logits = model(x)
            idx = torch.as_tensor(class_idx, device=logits.device).expand(len(logits))
            (grad,) = torch.autograd.grad(logits.gather(1, idx[:, None]).sum(), saved[-1])
    finally:
        handle.remove()
    a = saved[-1].detach()
    cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1))
    peak = cam.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))


def cbam_blocks(model):
    """[(label, CBAM module)] in forward order; the label names the block that holds it."""
    owners = {}
    for name, m in model.named_modules():
        if isinstance(m, (ResAttention, AttentionModule)):
            for sub in m.modules():
                if isinstance(sub, CBAM):
                    owners.setdefault(sub, f"{name} ({type(m).__name__})")
    return [(owners.get(m, name), m) for name, m in model.named_modules() if isinstance(m, CBAM)]


class AttentionRecorder:
    """Forward hooks on the ``gate`` of each CBAM block's channel and spatial attention: after a
    forward pass, ``maps`` holds per block {"label", "Mc" (B, C, 1, 1), "Ms" (B, 1, H, W)}, exactly
    the tensors the block multiplies its features by (the last forward pass only)."""

    def __init__(self, model):
        self.maps = [{"label": label} for label, _ in cbam_blocks(model)]
        self.handles = []
        for record, (_, cbam) in zip(self.maps, cbam_blocks(model)):
            for key, gate in (("Mc", cbam[0].gate), ("Ms", cbam[1].gate)):
                self.handles.append(gate.register_forward_hook(
                    lambda module, inputs, output, record=record, key=key: record.__setitem__(key, output.detach())))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


# ----------------------------------------------------------------------------------------------
# The inputs


def inputs(args, info):
    """[(network input (3, H, W), caption, true class index or None)], every file read first."""
    transform = info["transform"]
    if args.images:
        return [(transform(data.load_image(p)), os.path.basename(p), None) for p in args.images]
    test_x, test_y = data.open_test_set(info, args.checkpoint, args.data_dir, download=not args.no_download).test
    if args.test > len(test_y):
        raise UserError(f"--test {args.test}: the test set has {len(test_y)} images", exit_code=2)
    picked = np.sort(np.random.default_rng(args.seed).choice(len(test_y), args.test, replace=False))
    return [(transform(Image.fromarray(test_x[i])), f"test #{i}", int(test_y[i])) for i in picked]


def explain(model, items, device):
    """Per image: probabilities, predicted class, Grad-CAM and attention maps at the input's size."""
    results = []
    for x, caption, true in items:
        x = x[None].to(device)
        with torch.no_grad(), AttentionRecorder(model) as rec:
            probs = model(x).float().softmax(dim=1)[0].cpu()
        pred = int(probs.argmax())
        up = lambda m: F.interpolate(m.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0].cpu()
        cam = gradcam(model, x, pred)
        results.append({
            "image": denormalise(x[0].cpu()), "caption": caption, "true": true, "pred": pred,
            "prob": float(probs[pred]),
            "cam": up(cam[:, None]), "cam_size": tuple(cam.shape[-2:]),
            "blocks": [{"label": r["label"], "Ms": up(r["Ms"]), "Ms_size": tuple(r["Ms"].shape[-2:]),
                        "Ms_range": (float(r["Ms"].min()), float(r["Ms"].max())),
                        "Mc": r["Mc"].flatten().float().cpu()} for r in rec.maps]})
    return results


def denormalise(x):
    mean, std = torch.tensor(data.MEAN).view(3, 1, 1), torch.tensor(data.STD).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------------------------
# The figure


def figure_title(checkpoint, info, has_cbam):
    """The figure's title: the model, then its checkpoint by run folder and file, epoch and image size on
    a line of their own (on one line a seed-scale run's title was wider than the figure and cut off)."""
    return (f"{info['name']}:\n{report.checkpoint_label(checkpoint)} (epoch {info['epoch']}, {info['image_size']} px)"
            + ("" if has_cbam else "\nno CBAM blocks: Grad-CAM only"))


def plot(results, info, title, path):
    plt = report.pyplot()
    classes = info["classes"]
    blocks = [b["label"] for b in results[0]["blocks"]]
    rows, cols = len(results) + bool(blocks), 2 + len(blocks)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.25 * rows), squeeze=False, layout="constrained")
    overlay = dict(cmap="jet", alpha=0.5, interpolation="nearest")
    for r, res in enumerate(results):
        ax = axes[r]
        correct = res["true"] is None or res["true"] == res["pred"]
        ax[0].imshow(res["image"], interpolation="nearest")
        ax[0].set_title(res["caption"] + ("" if res["true"] is None else f"\ntrue {classes[res['true']]}"), fontsize=8)
        ax[1].imshow(res["image"], interpolation="nearest")
        ax[1].imshow(res["cam"], vmin=0, vmax=1, **overlay)
        h, w = res["cam_size"]
        ax[1].set_title(f"pred {classes[res['pred']]} {res['prob']:.2f}\nGrad-CAM ({h}x{w})", fontsize=8,
                        color="black" if correct else "red")
        for k, b in enumerate(res["blocks"]):
            lo, hi = b["Ms_range"]
            ax[2 + k].imshow(res["image"], interpolation="nearest")
            ax[2 + k].imshow(b["Ms"], vmin=lo, vmax=max(hi, lo + 1e-6), **overlay)
            h, w = b["Ms_size"]
            head = f"Ms {b['label']}\n" if r == 0 else ""
            ax[2 + k].set_title(f"{head}Ms {h}x{w}: {lo:.2f}-{hi:.2f}", fontsize=7 if r == 0 else 8)
        for a in ax:
            a.set_xticks([]), a.set_yticks([])
    if blocks:  # the last row: channel attention, one histogram per block
        ax = axes[-1]
        for a in ax[:2]:
            a.axis("off")
        ax[0].text(0, 0.5, "Last row: channel attention Mc\nof each CBAM block, all its\nchannels over the images "
                   "above.\n\nHeat maps: Grad-CAM scaled\nto its maximum; each Ms to\nits own range (min-max).",
                   fontsize=8, va="center", transform=ax[0].transAxes)
        for k, label in enumerate(blocks):
            mc = torch.cat([res["blocks"][k]["Mc"] for res in results]).numpy()
            ax[2 + k].hist(mc, bins=np.linspace(0, 1, 26), color="tab:blue")
            ax[2 + k].set_xlim(0, 1)
            ax[2 + k].set_title(f"Mc {label}\n{len(mc) // len(results)} channels x {len(results)} images", fontsize=7)
            ax[2 + k].tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9, wrap=True)
    report.save_figure(fig, path, dpi=80, note="")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rt = setup_runtime(args.device, distributed=False)
    model, info = checkpoints.load_model(args.checkpoint, rt.device)
    items = inputs(args, info)
    results = explain(model, items, rt.device)
    classes = info["classes"]
    for res in results:
        true = "" if res["true"] is None else f" (true {classes[res['true']]})"
        print(f"{res['caption']}{true}: predicted {classes[res['pred']]} {res['prob']:.3f}")
    plot(results, info, figure_title(args.checkpoint, info, bool(results[0]["blocks"])), args.out)
    print(f"figure: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
