"""`resnet_att`: frozen ImageNet ResNet-50 through layer4, then a trainable attention head:

    Conv1x1(2048 -> 480, no bias) -> BN -> ReLU -> ResAttention(480) -> AvgPool -> Linear(480, 10)

ResAttention(480) = two 3x3 convs with BN, CBAM(480, r=16), identity shortcut. Trainable
parameters: 983,040 + 960 + 4,178,018 + 4,810 = 5,166,828 (the seed: 5,108,884, +1.1%)."""
from models import resnet50_classifier

ATTENTION_DIM = 480  # the lower dimension after layer4; sized to the seed's parameter count


def build(weights="imagenet", num_classes=10, stride_in_1x1=None):
    return resnet50_classifier(weights, num_classes, freeze_backbone=True,
                               attention_dim=ATTENTION_DIM, stride_in_1x1=stride_in_1x1)
