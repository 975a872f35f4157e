"""Input normalisation: the one table of mean/std per pretraining recipe.

Images travel through the data pipeline as uint8 RGB; the model normalises them as its
first operation (so predict/export see the same numbers as training). A checkpoint layout
names its recipe (``models/backbones``; docs/checkpoints.md lists each published layout).
"""

from __future__ import annotations

import torch

# name -> (mean, std) for RGB in [0, 1]
NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "swav": ((0.485, 0.456, 0.406), (0.228, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def normalize_images(images: torch.Tensor, recipe: str) -> torch.Tensor:
    """uint8 or [0, 1] float images [B, 3, H, W] -> normalised float32, contiguous NCHW.

    Batches arrive as a permuted NHWC view; the conv weight-gradient kernels of torch 2.14
    on CPU corrupt memory on that layout when the weight is computed (LoRA), so the
    layout is made plain here, once, where the float copy is made anyway.
    """
    mean, std = NORMALIZATION[recipe]
    x = images.float().contiguous()
    if images.dtype == torch.uint8:
        x = x / 255.0
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t
