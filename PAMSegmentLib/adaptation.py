"""Test-time adaptation: fine-tune a copy of PAM's decoder on the drawn slice before a walk.

One-shot video object segmentation (OSVOS, Caelles et al. 2017) fine-tunes its network on the
annotated first frame; here the drawn slice is the only labelled data, so training pairs are made
from it alone: the guide and the query are two independent random smooth deformations (affine and
elastic) of the prompt's crop, image and mask alike, the query with an intensity jitter. Only the
decoder (the segmentation path) is trained; the encoders, cross-attention and the object-present
head stay as shipped, so where a walk ends changes only through the masks.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .network import ProposingStage

__all__ = ["AdaptationParams", "adapt_stage", "random_deformations"]


@dataclass(frozen=True)
class AdaptationParams:
    steps: int = 40
    lr: float = 3e-4
    queries: int = 4  # query deformations per step (one guide deformation each step)
    rotation_deg: float = 12.0
    scale: float = 0.12  # zoom within 1 +- scale
    shift: float = 0.06  # translation, fraction of the crop
    elastic: float = 0.04  # elastic displacement amplitude, fraction of the crop
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"adaptation steps must be >= 0, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"adaptation learning rate must be positive, got {self.lr}")
        if self.queries < 1:
            raise ValueError(f"adaptation queries must be >= 1, got {self.queries}")


def random_deformations(image: torch.Tensor, mask: torch.Tensor, n: int, params: AdaptationParams,
                        gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random smooth deformations of one (1, 1, S, S) image and its mask: (n, 1, S, S) each,
    the mask re-binarised. An affine map (rotation, zoom, shift) plus a smooth elastic field (a 4 x 4
    grid of random displacements, upsampled bicubically); outside the crop counts as the image's
    low end (-1) and background."""
    size = image.shape[-1]

    def u(*shape):  # uniform in [-1, 1]
        return torch.rand(*shape, generator=gen) * 2 - 1

    angle = u(n) * math.radians(params.rotation_deg)
    zoom = 1 + u(n) * params.scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, u(n) * 2 * params.shift], 1),
                         torch.stack([sin, cos, u(n) * 2 * params.shift], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, size, size), align_corners=False)
    field = F.interpolate(u(n, 2, 4, 4) * 2 * params.elastic, size=(size, size), mode="bicubic", align_corners=False)
    grid = grid + field.permute(0, 2, 3, 1)
    img = F.grid_sample(image.expand(n, -1, -1, -1) + 1, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False) - 1
    msk = F.grid_sample(mask.expand(n, -1, -1, -1).float(), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return img, (msk >= 0.5).float()


def _jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gamma, contrast, offset and noise in the windowed [-1, 1] space, one draw per slice."""
    n = x.shape[0]
    r = lambda: torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1  # noqa: E731
    u = ((x + 1) / 2).clamp(0, 1) ** torch.exp(0.3 * r())
    x = (u * 2 - 1) * (1 + 0.15 * r()) + 0.08 * r()
    return x + torch.randn(x.shape, generator=gen) * 0.05 * (r() + 1) / 2


def decoder_parameters(stage: ProposingStage) -> list[torch.nn.Parameter]:
    """The decoder's own parameters (its stages, up-convolutions and segmentation layers), not the
    encoder it references."""
    encoder_ids = {id(p) for p in stage.encoder.parameters()}
    return [p for p in stage.decoder.parameters() if id(p) not in encoder_ids]


def adapt_stage(stage: ProposingStage, guide_image: torch.Tensor, guide_mask: torch.Tensor,
                params: AdaptationParams) -> ProposingStage:
    """A copy of ``stage`` whose decoder is fine-tuned on deformation pairs of one guide crop
    ((1, 1, S, S) windowed image in [-1, 1] and {0, 1} mask). ``stage`` itself is left untouched."""
    from .training.trainer import pam_loss

    adapted = copy.deepcopy(stage)
    if params.steps == 0:
        return adapted.eval()
    for p in adapted.parameters():
        p.requires_grad_(False)
    trainable = decoder_parameters(adapted)
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.Adam(trainable, lr=params.lr)
    gen = torch.Generator().manual_seed(params.seed)
    guide_image, guide_mask = guide_image.detach().cpu().float(), guide_mask.detach().cpu().float()
    adapted.train()
    with torch.enable_grad():
        for _ in range(params.steps):
            g_img, g_msk = random_deformations(guide_image, guide_mask, 1, params, gen)
            if g_msk.sum() == 0:  # deformed off the crop: use the prompt as drawn
                g_img, g_msk = guide_image, guide_mask
            q_img, q_msk = random_deformations(guide_image, guide_mask, params.queries, params, gen)
            q_img = _jitter(q_img, gen)
            out = adapted(g_img, g_msk, q_img[None])
            target = q_msk[:, 0]
            loss, _ = pam_loss(out.logits, None, target, (target.flatten(1).amax(1) > 0).float(), 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p in adapted.parameters():
        p.requires_grad_(False)
    return adapted.eval()

