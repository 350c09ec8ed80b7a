"""Batched data augmentation on the training device, with random parameters drawn per image.

A policy is a list of ops applied to a whole batch of [0, 1] images (N x C x H x W) at once; every image
draws its own parameters (flip or not, crop offset, angle, box, op and magnitude...), so two identical
images in a batch come out different. Randomness comes from torch's global generator (seeded by the run's
seed and saved in checkpoints), so runs and resumes are reproducible.

Why not torchvision.transforms.v2 directly: applied to a batch it draws *one* set of parameters for the
whole batch, and applied per sample it needs a Python loop (or DataLoader workers) — 10x and more slower.

The package, by concern:

- ``functional``: kernels (affine matrices and warps, colour blends, shifted crops, box masks);
- ``ops``: the op registry (``OPS``, ``@op(name)``) and the per-image ops;
- ``auto``: RandAugment / TrivialAugment (torchvision's tables, one op per image);
- ``erasing``: random erasing (torchvision's RandomErasing, on the normalised images);
- ``augmix``: AugMix (torchvision's formula and op table, every image its own chains);
- ``mixing``: MixUp, CutMix and their switch, in timm's modes (soft targets);
- ``tta``: test-time-augmentation views and their averaged softmax;
- ``policy``: ``Policy`` and ``build_policy`` — training batches, preview, TTA, summary facts.

Importing the package imports every op module, so ``OPS`` holds every op.
"""

from regbench.augment.functional import (Batch, adjust_brightness, adjust_contrast, adjust_saturation,
                                         adjust_sharpness, box_mask, grayscale, inverse_affine, posterize,
                                         random_boxes, shifted_crop, solarize, warp)
from regbench.augment.ops import (OPS, Affine, Brightness, Contrast, Crop, Cutout, HFlip, Noise, Op, Saturation,
                                  VFlip, op)
from regbench.augment.auto import (GEOMETRIC, RandAugment, TrivialAugment, apply_named_op, geometric_ops,
                                   group_by_op)
from regbench.augment.erasing import RandomErasing, erase, erasing_boxes
from regbench.augment.augmix import AugMix, augmix_table
from regbench.augment.mixing import CutMix, Mixer, MixUp, MixUpCutMix, cutmix, mixup
from regbench.augment.policy import Policy, build_op, build_policy, preset_ops, preview_indices

__all__ = [
    "Batch", "adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_sharpness", "box_mask",
    "grayscale", "inverse_affine", "posterize", "random_boxes", "shifted_crop", "solarize", "warp",
    "OPS", "Affine", "Brightness", "Contrast", "Crop", "Cutout", "HFlip", "Noise", "Op", "Saturation", "VFlip", "op",
    "GEOMETRIC", "RandAugment", "TrivialAugment", "apply_named_op", "geometric_ops", "group_by_op",
    "RandomErasing", "erase", "erasing_boxes", "AugMix", "augmix_table",
    "CutMix", "Mixer", "MixUp", "MixUpCutMix", "cutmix", "mixup",
    "Policy", "build_op", "build_policy", "preset_ops", "preview_indices",
]
