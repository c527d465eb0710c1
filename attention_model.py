"""CBAM attention (Woo et al. 2018) and the small `sample_resnet` model built from it.

    channel attention  Mc = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F)))     one shared MLP C -> C/r -> C
    spatial attention  Ms = sigmoid(conv7x7([mean_c(F); max_c(F)]))
    CBAM               F' = Mc * F,  F'' = Ms * F'                         channel first, then spatial

Each attention module computes its sigmoid in a parameter-free submodule ``gate`` (nn.Sigmoid), so a
forward hook on ``ChannelAttention.gate`` / ``SpatialAttention.gate`` sees exactly the map the
features are multiplied by: Mc (B, C, 1, 1) / Ms (B, 1, H, W) (explain.py draws them). The gates
hold no parameters: the state-dict keys are those of the plain formulas.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ChannelAttention(nn.Module):
    """F -> Mc(F) * F; ``gate`` outputs Mc, shape (B, C, 1, 1)."""

    def __init__(self, channels, reduction=16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        # one MLP shared by both pooled descriptors; bias-free as in the paper's W1(W0(.))
        self.mlp = nn.Sequential(nn.Linear(channels, hidden, bias=False), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, channels, bias=False))
        self.gate = nn.Sigmoid()

    def forward(self, x):
        avg = self.mlp(x.mean(dim=(2, 3)))
        mx = self.mlp(x.amax(dim=(2, 3)))
        return x * self.gate((avg + mx)[:, :, None, None])


class SpatialAttention(nn.Module):
    """F -> Ms(F) * F; ``gate`` outputs Ms, shape (B, 1, H, W)."""

    def __init__(self, kernel_size=7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * self.gate(self.conv(pooled))


class CBAM(nn.Sequential):
    """Channel attention, then spatial attention."""

    def __init__(self, channels, reduction=16, kernel_size=7):
        super().__init__(ChannelAttention(channels, reduction), SpatialAttention(kernel_size))


class ResAttention(nn.Module):
    """A basic residual block whose residual branch ends with CBAM before the addition (CBAM paper,
    Fig. 3): relu(shortcut(x) + CBAM(bn(conv(relu(bn(conv(x))))))."""

    def __init__(self, in_channels, out_channels=None, stride=1, reduction=16):
        super().__init__()
        out_channels = out_channels or in_channels
        self.branch = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels),
            CBAM(out_channels, reduction),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):
        return F.relu(self.shortcut(x) + self.branch(x))


class AttentionModule(nn.Module):
    """A standalone CBAM step with its own residual connection: x + CBAM(x) = (1 + Mc*Ms) x.

    The residual form (attention residual learning, Wang et al. 2017) keeps the identity path, so
    the module can only re-weight features upwards, never zero them; ``residual=False`` gives the
    plain CBAM(x)."""

    def __init__(self, channels, reduction=16, residual=True):
        super().__init__()
        self.cbam = CBAM(channels, reduction)
        self.residual = residual

    def forward(self, x):
        return x + self.cbam(x) if self.residual else self.cbam(x)


class SampleResNet(nn.Module):
    """Conv7x7/2 -> BN -> ReLU -> MaxPool -> ResAttention -> AttentionModule -> ResAttention
    -> global AvgPool -> FC. Width 78 gives 234,226 trainable parameters (the seed: ~230,000)."""

    def __init__(self, num_classes=10, width=78):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
            ResAttention(width),
            AttentionModule(width),
            ResAttention(width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def build(num_classes=10, **_):
    """`sample_resnet`: no pretrained weights, so ``weights`` is accepted and ignored."""
    return SampleResNet(num_classes)
