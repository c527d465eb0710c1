"""`resnet`: ImageNet ResNet-50, every layer frozen, a new Linear(2048, 10): 20,490 trainable parameters."""
from models import resnet50_classifier


def build(weights="imagenet", num_classes=10, stride_in_1x1=None):
    return resnet50_classifier(weights, num_classes, freeze_backbone=True, stride_in_1x1=stride_in_1x1)
