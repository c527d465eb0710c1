"""The five models: CBAM formulas, parameter counts, frozen backbones, shapes, ResNet-50 weights.

Everything runs on the CPU with small inputs; the real-weights checks need RESNET50_WEIGHTS (and
CIFAR10_ROOT for the linear probe) and skip, saying why, without them.
"""
import functools
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import data
import models
from attention_model import CBAM, AttentionModule, ChannelAttention, SpatialAttention

ALL_MODELS = ["sample_resnet", "resnet", "resnet_scratch", "resnet_att", "resnet_att_scratch"]
RESNET_MODELS = ALL_MODELS[1:]


# ----------------------------------------------------------------------------------------------
# CBAM: the modules against an independent computation of the paper's formulas


def _linears(module):
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def channel_attention_ref(module, x):
    """Mc = sigmoid(MLP(AvgPool F) + MLP(MaxPool F)) with one shared MLP C -> C/r -> C (ReLU)."""
    w0, w1 = _linears(module)

    def mlp(v):
        h = v @ w0.weight.T + (w0.bias if w0.bias is not None else 0)
        h = torch.clamp(h, min=0)
        return h @ w1.weight.T + (w1.bias if w1.bias is not None else 0)

    avg = x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3])
    mx = x.flatten(2).max(dim=2).values
    mc = 1 / (1 + torch.exp(-(mlp(avg) + mlp(mx))))
    return x * mc[:, :, None, None]


def spatial_attention_ref(module, x):
    """Ms = sigmoid(conv7x7([mean_c F; max_c F]))."""
    conv = [m for m in module.modules() if isinstance(m, nn.Conv2d)][0]
    pooled = torch.stack([x.mean(dim=1), x.max(dim=1).values], dim=1)
    k = conv.weight.shape[-1]
    ms = torch.sigmoid(F.conv2d(pooled, conv.weight, conv.bias, padding=k // 2))
    return x * ms


@pytest.mark.parametrize("channels,reduction", [(32, 16), (64, 8), (48, 16)])
def test_channel_attention_matches_formula(channels, reduction):
    torch.manual_seed(0)
    module = ChannelAttention(channels, reduction)
    w0, w1 = _linears(module)
    assert w0.weight.shape == (channels // reduction, channels)  # C -> C/r
    assert w1.weight.shape == (channels, channels // reduction)  # C/r -> C
    x = torch.randn(3, channels, 7, 5) * 2
    x_copy = x.clone()
    with torch.no_grad():
        out, ref = module(x), channel_attention_ref(module, x)
    assert torch.equal(x, x_copy)  # the input is not modified
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # the attention really re-weights channels differently (so the comparison can tell formulas apart)
    ratio = (out / x)[:, :, 0, 0]
    assert ratio.std(dim=1).max() > 1e-3


@pytest.mark.parametrize("kernel_size", [7, 3])
def test_spatial_attention_matches_formula(kernel_size):
    torch.manual_seed(1)
    module = SpatialAttention(kernel_size)
    conv = [m for m in module.modules() if isinstance(m, nn.Conv2d)][0]
    assert conv.weight.shape == (1, 2, kernel_size, kernel_size)
    x = torch.randn(2, 16, 9, 11)
    with torch.no_grad():
        out, ref = module(x), spatial_attention_ref(module, x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, x, atol=1e-3)


def test_cbam_is_channel_then_spatial():
    torch.manual_seed(2)
    cbam = CBAM(32, 8)
    ca = [m for m in cbam.modules() if isinstance(m, ChannelAttention)]
    sa = [m for m in cbam.modules() if isinstance(m, SpatialAttention)]
    assert len(ca) == len(sa) == 1
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        out = cbam(x)
        channel_first = spatial_attention_ref(sa[0], channel_attention_ref(ca[0], x))
        spatial_first = channel_attention_ref(ca[0], spatial_attention_ref(sa[0], x))
    torch.testing.assert_close(out, channel_first, rtol=1e-5, atol=1e-6)
    # the order matters, so the check above can tell the two apart
    assert (out - spatial_first).abs().max() > 1e-3


def test_attention_module_is_residual_cbam():
    torch.manual_seed(3)
    module = AttentionModule(32, 8)
    ca = [m for m in module.modules() if isinstance(m, ChannelAttention)][0]
    sa = [m for m in module.modules() if isinstance(m, SpatialAttention)][0]
    x = torch.randn(2, 32, 6, 6)
    with torch.no_grad():
        out = module(x)
        ref = x + spatial_attention_ref(sa, channel_attention_ref(ca, x))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Parameter counts and shapes (random weights: weights="none")


@functools.lru_cache(maxsize=None)
def _built(name):
    """One random-weights instance per model, shared by the read-only tests below."""
    torch.manual_seed(0)
    return models.build_model(name, weights="none")[0]


def test_resnet_parameter_counts_exact():
    trainable, total = models.count_parameters(_built("resnet"))
    assert trainable == 20_490  # Linear(2048, 10) only
    trainable_s, total_s = models.count_parameters(_built("resnet_scratch"))
    assert trainable_s == total_s == 23_528_522
    assert total == total_s  # the same network, only frozen


@pytest.mark.parametrize("name,trainable,total", [
    ("sample_resnet", 234_226, 234_226),
    ("resnet", 20_490, 23_528_522),
    ("resnet_att", 5_166_828, 28_674_860),
    ("resnet_scratch", 23_528_522, 23_528_522),
    ("resnet_att_scratch", 28_674_860, 28_674_860),
])
def test_parameter_counts_are_the_readmes(name, trainable, total):
    """Issue 33: the exact counts the README and the variant files state (and --dry-run prints): a
    changed layer (say the CBAM reduction 16 -> 8 in the head: +28,800) changes them."""
    assert models.count_parameters(_built(name)) == (trainable, total)


@pytest.mark.parametrize("name,target,tolerance", [
    ("sample_resnet", 230_000, 0.05),
    ("resnet_att", 5_108_884, 0.03),
    ("resnet_att_scratch", 28_616_876, 0.01),
])
def test_parameter_counts_near_the_seed(name, target, tolerance):
    trainable, total = models.count_parameters(_built(name))
    assert abs(trainable - target) <= tolerance * target, (name, trainable, target)
    if name == "sample_resnet":
        assert trainable == total
    if name == "resnet_att":
        scratch_trainable, scratch_total = models.count_parameters(_built("resnet_att_scratch"))
        assert total == scratch_total == scratch_trainable  # same network, backbone frozen or not
        assert total - trainable == 23_508_032  # torchvision's ResNet-50 without its fc


def test_unknown_model_is_a_user_error():
    from utils import UserError
    with pytest.raises(UserError, match="unknown model"):
        models.build_model("resnet51", weights="none")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_shapes(name):
    model = _built(name).eval()
    with torch.inference_mode():
        for size in (32, 64, 224):
            x = torch.randn(2, 3, size, size)
            out = model(x)
            assert out.shape == (2, 10), (name, size)
            assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_num_classes():
    model, config = models.build_model("resnet", weights="none", num_classes=7)
    with torch.inference_mode():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert config["num_classes"] == 7 and config["name"] == "resnet"


# ----------------------------------------------------------------------------------------------
# Frozen backbones stay bit-identical through a training step in train mode


def _one_training_step(model):
    """-> (state before, state after) of one SGD step (momentum, weight decay) in train mode,
    the optimizer given every parameter as a careless training loop would."""
    torch.manual_seed(0)
    model.train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return before, model.state_dict()


def _backbone_keys(state):
    keys = [k for k in state if k.startswith("backbone.")]
    # every tensor of torchvision's ResNet-50 but its fc: weights and BatchNorm buffers
    with torch.device("meta"):  # only the names: no memory, no initialisation time
        expected = {k for k in torchvision.models.resnet50().state_dict() if not k.startswith("fc.")}
    assert {k[len("backbone."):] for k in keys} == expected
    assert any(k.endswith("running_mean") for k in keys) and any(k.endswith("num_batches_tracked") for k in keys)
    return keys


@pytest.mark.parametrize("name", ["resnet", "resnet_att"])
def test_frozen_backbone_is_bit_identical_after_a_step(name):
    model, _ = models.build_model(name, weights="none")
    before, after = _one_training_step(model)
    backbone = _backbone_keys(before)
    moved = [k for k in backbone if not torch.equal(before[k], after[k])]
    assert not moved, f"frozen backbone tensors changed: {moved[:5]}"
    head = [k for k in before if not k.startswith("backbone.")]
    assert head
    assert not torch.equal(before["head.fc.weight"], after["head.fc.weight"])
    assert not torch.equal(before["head.fc.bias"], after["head.fc.bias"])
    if name == "resnet_att":  # the attention head itself trains, BatchNorm statistics included
        changed = {k for k in head if not torch.equal(before[k], after[k])}
        assert any(k.endswith("running_mean") for k in changed)
        assert any(k.endswith(".weight") and "fc" not in k for k in changed)


def test_scratch_backbone_does_change():
    """The counterpart of the frozen test: the same check fails on a trained backbone."""
    model, _ = models.build_model("resnet_scratch", weights="none")
    before, after = _one_training_step(model)
    backbone = _backbone_keys(before)
    moved = {k for k in backbone if not torch.equal(before[k], after[k])}
    for k in ("backbone.conv1.weight", "backbone.bn1.running_mean", "backbone.bn1.running_var",
              "backbone.bn1.num_batches_tracked", "backbone.layer4.2.conv3.weight"):
        assert k in moved, k


# ----------------------------------------------------------------------------------------------
# ResNet-50 weights files and the v1 / v1.5 layouts


DOWNSAMPLING = ("layer2", "layer3", "layer4")


def _strides(model):
    """[(conv1.stride, conv2.stride)] of the first block of layer2, layer3, layer4."""
    return [(getattr(model.backbone, l)[0].conv1.stride, getattr(model.backbone, l)[0].conv2.stride)
            for l in DOWNSAMPLING]


V1 = [((2, 2), (1, 1))] * 3  # stride in the 1x1 conv (MSRA ResNet v1)
V15 = [((1, 1), (2, 2))] * 3  # stride in the 3x3 conv (torchvision)


def _assert_backbone_equals(model, state):
    own = model.backbone.state_dict()
    assert set(own) == {k for k in state if not k.startswith("fc.")}
    for k, v in own.items():
        assert torch.equal(v, state[k].to(v.dtype)), k


def test_plain_torchvision_state_dict_gives_v15_layout(tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.resnet50().state_dict()
    path = tmp_path / "plain.pth"
    torch.save(state, path)
    model, config = models.build_model("resnet", weights=str(path))
    assert _strides(model) == V15
    assert config["stride_in_1x1"] is False
    _assert_backbone_equals(model, state)


def test_meta_stride_in_1x1_and_checkpoint_rebuild(tmp_path):
    torch.manual_seed(0)
    state = {k: v.half() if v.is_floating_point() and v.dim() > 1 else v
             for k, v in torchvision.models.resnet50().state_dict().items()}  # fp16 convs, as the real file
    path = tmp_path / "v1.pth"
    torch.save({"state_dict": state, "meta": {"stride_in_1x1": True}}, path)
    model, config = models.build_model("resnet_att", weights=str(path))
    assert _strides(model) == V1
    assert config["stride_in_1x1"] is True
    _assert_backbone_equals(model, state)
    assert model.backbone.conv1.weight.dtype == torch.float32

    # a checkpoint stores the config (plain types) and the state_dict; they rebuild the same network
    config = json.loads(json.dumps(config))
    rebuilt, config2 = models.build_model(config["name"], weights="none", num_classes=config["num_classes"],
                                          stride_in_1x1=config["stride_in_1x1"])
    assert _strides(rebuilt) == V1 and config2 == config
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = model.eval()(x)
        torch.testing.assert_close(rebuilt.eval()(x), out)
        # without the recorded layout the same weights give another function
        v15, _ = models.build_model(config["name"], weights="none", stride_in_1x1=False)
        assert _strides(v15) == V15
        v15.load_state_dict(model.state_dict())
        assert (v15.eval()(x) - out).abs().max() > 1e-3


def test_weights_file_that_is_not_a_state_dict(tmp_path):
    from utils import UserError
    path = tmp_path / "junk.pth"
    torch.save({"a": 1}, path)
    with pytest.raises(UserError, match="junk.pth"):
        models.build_model("resnet", weights=str(path))
    path.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="junk.pth"):
        models.build_model("resnet", weights=str(path))


def test_real_weights_load_with_v1_layout(weights_path):
    model, config = models.build_model("resnet", weights=weights_path)
    assert _strides(model) == V1
    assert model.backbone.layer2[0].conv1.stride == (2, 2) and model.backbone.layer2[0].conv2.stride == (1, 1)
    assert config["stride_in_1x1"] is True
    obj = torch.load(weights_path, map_location="cpu", weights_only=True)
    _assert_backbone_equals(model, obj["state_dict"])


def _pooled_features(model, images, size):
    loader = data.TensorLoader(images, np.zeros(len(images), dtype=np.int64), 100, size, train=False,
                               device="cpu", augment=False)
    out = []
    with torch.inference_mode():
        for x, _ in loader:
            out.append(model.features(x).mean(dim=(2, 3)).double())
    return torch.cat(out)


def _ridge_probe_accuracy(f_train, y_train, f_test, y_test, lam=10.0):
    """Closed-form ridge regression on one-hot targets (dual form: n << 2048 features)."""
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    a, b = (f_train - mu) / sd, (f_test - mu) / sd
    y = F.one_hot(torch.as_tensor(y_train), 10).double()
    y = y - y.mean(0)
    alpha = torch.linalg.solve(a @ a.T + lam * len(a) * torch.eye(len(a), dtype=a.dtype), y)
    pred = (b @ a.T @ alpha).argmax(1).numpy()
    return float((pred == y_test).mean())


def test_real_weights_features_separate_cifar_classes(weights_path, cifar):
    """A linear probe on pooled layer4 features, 200 training / 200 other training images at 64 px.

    Measured (ridge, lambda=10): loaded MSRA v1 weights 0.63, random backbone 0.265
    (with 300 / 300 images: 0.61 vs 0.21). Bounds set well below: >= 0.45 and >= random + 0.2.
    """
    train_x, train_y = cifar[0], cifar[1]
    idx = np.random.default_rng(0).choice(len(train_y), 400, replace=False)
    fit, score = idx[:200], idx[200:]
    accuracy = {}
    for weights in (weights_path, "none"):
        torch.manual_seed(0)
        model, _ = models.build_model("resnet", weights=weights)
        model.eval()
        feats = _pooled_features(model, train_x[idx], 64)
        accuracy[weights] = _ridge_probe_accuracy(feats[:200], train_y[fit], feats[200:], train_y[score])
    real, random_init = accuracy[weights_path], accuracy["none"]
    print(f"linear probe accuracy: real weights {real:.3f}, random backbone {random_init:.3f}")
    assert real >= 0.45, accuracy
    assert real >= random_init + 0.2, accuracy


@pytest.mark.parametrize("flag,enum", [("imagenet", "IMAGENET1K_V1"), ("imagenet_v2", "IMAGENET1K_V2")])
def test_weights_flags_ask_torchvision_for_the_named_weights(flag, enum, monkeypatch):
    """Issue 33: --weights imagenet is the seed's pretrained=True (IMAGENET1K_V1), imagenet_v2 the
    newer recipe (IMAGENET1K_V2): the URL torchvision's weights API is asked for, loaded
    weights-only, and the numbers it returns are the ones in the model."""
    import torchvision
    import torchvision.models._api as api
    asked = []
    torch.manual_seed(1)
    served = torchvision.models.resnet50().state_dict()

    def fetch(url, *args, **kwargs):
        asked.append((url, kwargs.get("weights_only")))
        return served
    monkeypatch.setattr(api, "load_state_dict_from_url", fetch)
    model, _ = models.build_model("resnet_scratch", weights=flag)
    assert asked == [(getattr(torchvision.models.ResNet50_Weights, enum).url, True)]
    assert torch.equal(model.backbone.conv1.weight, served["conv1.weight"])
    assert model.stride_in_1x1 is False  # torchvision's own weights: its v1.5 layout
