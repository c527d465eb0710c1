"""`resnet_scratch`: ResNet-50 with a Linear(2048, 10), every layer trained: 23,528,522 parameters.

It starts from ImageNet weights unless built with weights='none' (a random start), as the seed
did: its log shows 83% training accuracy after the first epoch, which no random start gives."""
from models import resnet50_classifier


def build(weights="imagenet", num_classes=10, stride_in_1x1=None):
    return resnet50_classifier(weights, num_classes, freeze_backbone=False, stride_in_1x1=stride_in_1x1)
