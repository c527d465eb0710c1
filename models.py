"""The five models by name, and the one ResNet-50 implementation the four ResNet variants share.

Each variant file (ResNet.py, ResNet_scratch.py, ResNet_att.py, ResNet_att_scratch.py,
attention_model.py) has a thin ``build(weights, num_classes, stride_in_1x1)``; this module holds
the registry, the backbone builder, the weights loading and the one classification head.
"""
import importlib
import os
import pickle
import urllib.error

import torch
import torch.nn as nn
import torchvision

from attention_model import ResAttention
from torchfile import plain_tensor, safe_load
from utils import UserError

# --model name -> (module that builds it, file name of its best checkpoint, as the seed's)
MODELS = {
    "sample_resnet": ("attention_model", "Sample_ResNet.pth"),
    "resnet": ("ResNet", "ResNet.pth"),
    "resnet_scratch": ("ResNet_scratch", "ResNet_scratch.pth"),
    "resnet_att": ("ResNet_att", "ResNet_att.pth"),
    "resnet_att_scratch": ("ResNet_att_scratch", "ResNet_att_scratch.pth"),
}
TORCHVISION_WEIGHTS = {
    "imagenet": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,  # the seed's pretrained=True
    "imagenet_v2": torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
}


def build_model(name, weights="imagenet", num_classes=10, stride_in_1x1=None):
    """-> (model, config); ``config`` (plain types) rebuilds the same network with weights='none'."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose from {', '.join(MODELS)}", exit_code=2)
    model = importlib.import_module(MODELS[name][0]).build(
        weights=weights, num_classes=num_classes, stride_in_1x1=stride_in_1x1)
    config = {"name": name, "num_classes": num_classes,
              "stride_in_1x1": getattr(model, "stride_in_1x1", None)}
    return model, config


def count_parameters(model):
    """(trainable, total), as the seed's table counts them."""
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()))


# ----------------------------------------------------------------------------------------------
# ResNet-50 weights


def load_resnet50_state(weights):
    """'imagenet' | 'imagenet_v2' | 'none' | PATH -> (state_dict or None, stride_in_1x1).

    A local file is a torchvision state_dict, or {'state_dict', 'meta'} whose
    meta['stride_in_1x1'] asks for the ResNet v1 layout (stride 2 in the 1x1 conv)."""
    if weights == "none":
        return None, False
    if weights in TORCHVISION_WEIGHTS:
        try:  # torch.hub loads with weights_only=False unless told: the cached file could run code
            return TORCHVISION_WEIGHTS[weights].get_state_dict(progress=True, weights_only=True), False
        except pickle.UnpicklingError:
            url = TORCHVISION_WEIGHTS[weights].url
            cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
            raise UserError(f"{cached} (torchvision's ResNet-50 {weights} weights) was refused by "
                            f"torch.load(weights_only=True): it holds more than tensors; delete it") from None
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            raise UserError(f"could not download torchvision's ResNet-50 {weights} weights ({e}). Offline? "
                            f"Pass --weights PATH to a local ResNet-50 state_dict (e.g. $RESNET50_WEIGHTS), "
                            f"put torchvision's file in $TORCH_HOME/hub/checkpoints, or use --weights none") from None
    obj = safe_load(weights, "weights file")
    meta = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj, meta = obj["state_dict"], obj.get("meta")
        meta = {} if meta is None else meta
        stride = meta.get("stride_in_1x1", False) if isinstance(meta, dict) else None
        if not (isinstance(stride, int) and stride in (0, 1)):  # bool is an int
            raise UserError(f"weights file {weights}: its meta is not a dict whose stride_in_1x1 is true or false")
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and plain_tensor(v) for k, v in obj.items()):
        raise UserError(f"weights file {weights} is not a state_dict (a dict of names to dense, real tensors)")
    return obj, bool(meta.get("stride_in_1x1", False))


def use_stride_in_1x1(resnet):
    """ResNet v1 layout: the stride-2 of each downsampling bottleneck in conv1 (1x1), not conv2."""
    for layer in (resnet.layer2, resnet.layer3, resnet.layer4):
        block = layer[0]
        block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)


def resnet50_backbone(weights, stride_in_1x1=None):
    """torchvision's ResNet-50 with the requested weights and layout; ``stride_in_1x1`` (from a
    checkpoint) overrides the layout the weights ask for."""
    state, file_layout = load_resnet50_state(weights)
    resnet = torchvision.models.resnet50()
    resnet.stride_in_1x1 = file_layout if stride_in_1x1 is None else bool(stride_in_1x1)
    if resnet.stride_in_1x1:
        use_stride_in_1x1(resnet)
    if state is not None:
        try:
            resnet.load_state_dict(state)
        except RuntimeError as e:
            detail = " ".join(str(e).split())[:300]
            raise UserError(f"weights {weights} do not fit torchvision's ResNet-50: {detail}") from None
    del resnet.fc  # replaced by the head
    return resnet


# ----------------------------------------------------------------------------------------------
# The shared classifier: backbone feature map -> head


class Head(nn.Module):
    """Global average pooling and a linear classifier. With ``attention_dim``, the feature map first
    goes through a 1x1 conv (+BN, ReLU) to that many channels and one ResAttention block: the one
    place attention enters the ResNet models."""

    def __init__(self, in_channels, num_classes, attention_dim=None):
        super().__init__()
        layers = []
        if attention_dim:
            layers = [nn.Conv2d(in_channels, attention_dim, 1, bias=False), nn.BatchNorm2d(attention_dim),
                      nn.ReLU(inplace=True), ResAttention(attention_dim)]
            in_channels = attention_dim
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, feature_map):
        return self.fc(self.body(feature_map).mean(dim=(2, 3)))


class ResNet50Classifier(nn.Module):
    """ResNet-50 through layer4, then ``Head``. A frozen backbone has no trainable parameter,
    stays in eval mode (its BatchNorm statistics never move) and runs without autograd."""

    def __init__(self, backbone, head, freeze_backbone):
        super().__init__()
        self.backbone, self.head, self.frozen = backbone, head, freeze_backbone
        self.stride_in_1x1 = backbone.stride_in_1x1
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode=True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def features(self, x):
        if self.frozen and torch.is_grad_enabled():  # no autograd through a frozen backbone
            with torch.no_grad():
                return self.backbone_features(x)
        return self.backbone_features(x)  # (no grad-mode switch in the graph: torch.export traces it)

    def backbone_features(self, x):
        r = self.backbone
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        return r.layer4(r.layer3(r.layer2(r.layer1(x))))

    def forward(self, x):
        return self.head(self.features(x))


def resnet50_classifier(weights, num_classes, freeze_backbone, attention_dim=None, stride_in_1x1=None):
    backbone = resnet50_backbone(weights, stride_in_1x1)
    return ResNet50Classifier(backbone, Head(2048, num_classes, attention_dim), freeze_backbone)
