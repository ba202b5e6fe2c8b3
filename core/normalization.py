"""The ImageNet channel statistics every network input is normalised with (datasets.Preprocess),
and that CutPaste undoes to augment images in [0, 1] RGB."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
