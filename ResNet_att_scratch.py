"""`resnet_att_scratch`: the resnet_att network with every layer trained (ImageNet start unless
weights='none'): 23,508,032 backbone + 5,166,828 head = 28,674,860 parameters (the seed: 28,616,876)."""
from models import resnet50_classifier
from ResNet_att import ATTENTION_DIM


def build(weights="imagenet", num_classes=10, stride_in_1x1=None):
    return resnet50_classifier(weights, num_classes, freeze_backbone=False,
                               attention_dim=ATTENTION_DIM, stride_in_1x1=stride_in_1x1)
