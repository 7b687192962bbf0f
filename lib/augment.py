"""Batched augmentation on the training device: uint8 batches in, normalised float batches out.

    crop      a mild random resized crop (area 0.6-1), never flipped (captions say left and right)
    mocov2    MoCo v2's augmentation, the official FDT recipe's: crop 0.2-1, colour jitter,
              grayscale, blur, horizontal flip
    apply     what train.py calls: --augment's kind, with its random numbers drawn per step

The random numbers come in as uniforms (one row per image), drawn by `apply` for the global batch
from (seed, step), so that each DDP process keeps its own slice of the same draws and a resumed run
redraws the same augmentation. Everything else runs on the batch's device: nothing is read back to
the host, which on a GPU would wait for the device every step.
"""

import math

import torch
import torch.nn.functional as F

from data import normalise, preprocess


def _resized_crop(x: torch.Tensor, u: torch.Tensor, scale, ratio, flip=None) -> torch.Tensor:
    """A random resized crop per image of a float batch (B, 3, H, W), from uniforms u (B, 4) on
    x's device: area fraction in `scale`, aspect ratio in `ratio`, x and y of the crop; flip (B,)
    bool mirrors."""
    B, _, H, W = x.shape
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1])
    w = (area * aspect).sqrt().clamp(max=1)  # crop size as a fraction of the image
    h = (area / aspect).sqrt().clamp(max=1)
    theta = u.new_zeros(B, 2, 3)             # output [-1, 1] -> input [centre - w, centre + w]
    theta[:, 0, 0] = w if flip is None else torch.where(flip, -w, w)  # negative: mirrored
    theta[:, 1, 1] = h
    theta[:, 0, 2] = (1 - w) * (2 * u[:, 2] - 1)  # the crop stays inside the image
    theta[:, 1, 2] = (1 - h) * (2 * u[:, 3] - 1)
    grid = F.affine_grid(theta, [B, 3, H, W], align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def crop(images: torch.Tensor, u: torch.Tensor,
            scale: tuple[float, float] = (0.6, 1.0),
            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float32 normalised, a random resized crop per image (area fraction in
    `scale`, aspect ratio in `ratio`), batched on the images' device. Never flipped: captions say
    left and right. u: (B, 4) uniforms in [0, 1), one row per image (area, aspect, x, y); they are
    drawn by the caller so that each DDP process can draw the global batch's rows from one seed and
    keep its own slice, and a resumed run redraws the same crops."""
    u = u.to(images.device, non_blocking=True)
    return _resized_crop(preprocess(images), u, scale, ratio)


MOCOV2_DRAWS = 13  # uniforms per image that mocov2 reads

# hue: a rotation by h of YIQ's chroma plane (I, Q), an approximation of torchvision's HSV shift.
# As one RGB -> RGB matrix, from_yiq @ R(h) @ to_yiq, with R(h) = diag(1, 0, 0)
# + cos h diag(0, 1, 1) + sin h (I, Q turned by 90 degrees)
# = HUE_BASIS[0] + cos h HUE_BASIS[1] + sin h HUE_BASIS[2]
_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                       dtype=torch.float64)
HUE_BASIS = torch.stack([torch.linalg.inv(_TO_YIQ) @ part @ _TO_YIQ for part in (
    torch.diag(torch.tensor([1.0, 0, 0], dtype=torch.float64)),
    torch.diag(torch.tensor([0, 1.0, 1], dtype=torch.float64)),
    torch.tensor([[0, 0, 0], [0, 0, -1.0], [0, 1, 0]], dtype=torch.float64))]).float()  # (3, 3, 3)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 1, H, W) luma (ITU-R 601, as torchvision's
    rgb_to_grayscale)."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def mocov2(images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float32 normalised, with MoCo v2's augmentation (Chen et al. 2020, the
    official FDT recipe), batched: a random resized crop (area 0.2-1), with probability 0.8 a colour
    jitter (brightness, contrast, saturation 0.4, hue 0.1; applied in that order, where torchvision
    shuffles it), grayscale with probability 0.2, a Gaussian blur (sigma 0.1-2, kernel 10 % of the
    image) with probability 0.5, and a horizontal flip with probability 0.5. u: (B, MOCOV2_DRAWS)
    uniforms in [0, 1), drawn by the caller as for `crop`."""
    B, _, H, W = images.shape
    u = u.to(images.device, non_blocking=True)
    x = _resized_crop(images.float() / 255, u[:, :4], (0.2, 1.0), (3 / 4, 4 / 3),
                      flip=u[:, 4] < 0.5)
    per_image = lambda v: v.view(B, 1, 1, 1)  # noqa: E731  (B,) -> (B, 1, 1, 1)
    b, c, s = (per_image(1 + 0.4 * (2 * u[:, k] - 1)) for k in (6, 7, 8))
    hue = 2 * math.pi * 0.1 * (2 * u[:, 9] - 1)                              # (B,) radians
    y = (x * b).clamp(0, 1)
    mean = _gray(y).mean(dim=(1, 2, 3), keepdim=True)                         # (B, 1, 1, 1)
    y = ((y - mean) * c + mean).clamp(0, 1)
    g = _gray(y)
    y = ((y - g) * s + g).clamp(0, 1)
    terms = torch.stack([torch.ones_like(hue), hue.cos(), hue.sin()], dim=1)  # (B, 3)
    basis = HUE_BASIS.to(x.device, non_blocking=True)                        # (3, 3, 3)
    mix = torch.einsum("bn,nij->bij", terms, basis)                           # (B, 3, 3) RGB -> RGB
    y = torch.einsum("bij,bjhw->bihw", mix, y).clamp(0, 1)
    x = torch.where(per_image(u[:, 5] < 0.8), y, x)
    x = torch.where(per_image(u[:, 10] < 0.2), _gray(x).expand(-1, 3, -1, -1), x)
    sigma = 0.1 + 1.9 * u[:, 12]                                              # (B,)
    radius = max(1, round(0.05 * H))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)  # (k,)
    kernel = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None] ** 2))     # (B, k)
    # (3B, k), one per channel
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(3, dim=0)
    # images as channels: one grouped conv
    flat = x.reshape(1, 3 * B, H, W)
    blurred = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"),
                       kernel[:, None, None, :], groups=3 * B)
    blurred = F.conv2d(F.pad(blurred, (0, 0, radius, radius), mode="reflect"),
                       kernel[:, None, :, None], groups=3 * B)
    x = torch.where(per_image(u[:, 11] < 0.5), blurred.view(B, 3, H, W), x)
    return normalise(x)


def apply(images: torch.Tensor, kind: str, seed: int, step: int, batch_size: int,
          local: slice) -> torch.Tensor:
    """uint8 batch -> normalised float, augmented as `kind` (none, crop, mocov2) says. The random
    draws are for the global batch of `batch_size`, from (seed, step), this process's rows `local`
    kept: a resumed run redraws the same augmentation and N processes augment exactly as one
    process would."""
    if kind == "none":
        return preprocess(images)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    if kind == "crop":
        return crop(images, torch.rand(batch_size, 4, generator=g)[local])
    return mocov2(images, torch.rand(batch_size, MOCOV2_DRAWS, generator=g)[local])
