"""PAM's proposing-stage network: a 2D plain-conv U-Net whose query-slice skips attend to a
guiding slice and its mask.

Shapes (G guides, N queries per guide, S = config.input_size):
    guide_image  (G, 1, S, S)   guiding slice, intensities in [-1, 1]
    guide_mask   (G, 1, S, S)   its binary mask as float {0, 1}
    query_images (G, N, 1, S, S)
    -> PAMOutput.logits: list of (G*N, 2, s, s) maps, largest scale first
       PAMOutput.presence: (G*N,) object-present logits, or None for presets without the head

The U-Net and the mask encoder are `dynamic-network-architectures` building blocks (the exact
classes PAM's authors used), so the `official` preset reproduces the published state-dict
layout key for key; see ``PAMSegmentLib.checkpoints`` for loading the authors' file.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from torch import nn

from .checks import names_shown, shown

__all__ = ["PAMConfig", "PRESETS", "PAMNetwork", "PAMOutput", "CrossAttention", "InstanceNorm", "build_network"]


@dataclass(frozen=True)
class PAMConfig:
    """Size of a PAM network. Everything a checkpoint needs to rebuild its network."""

    name: str = "official"
    input_size: int = 224
    n_stages: int = 6
    base_features: int = 32
    max_features: int = 512
    n_conv_per_stage: int = 2
    n_attention_stages: int = 4  # cross-attention at this many deepest stages
    presence_head: bool = False  # extra object-present logit (ours; absent from the official net)
    # Ours: the image encoder also sees the guide's mask as a second channel (on the guide itself
    # and, as a prior, on every query), so full-resolution features know where the object was;
    # in the official net the mask enters only through attention at the deepest stages.
    mask_prior: bool = False

    @property
    def features(self) -> list[int]:
        return [min(self.base_features * 2**i, self.max_features) for i in range(self.n_stages)]

    @property
    def attention_stages(self) -> list[int]:
        return list(range(self.n_stages - self.n_attention_stages, self.n_stages))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PAMConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted((k for k in d if k not in known), key=str)  # (keys of any type: a header is untrusted)
        if unknown:
            raise ValueError(f"unknown network config field(s): {names_shown(unknown)}")
        return cls(**d)

    def validate(self) -> None:
        """Raise ValueError unless the config describes a network of sane size: checked before the
        network is built from an untrusted file (a few bytes of header could ask for 36 TB)."""
        # The official network (224 px, 6 stages, 32..512 features) is the largest PAM there is.
        for name, lo, hi in (("input_size", 16, 512), ("n_stages", 2, 7), ("base_features", 1, 64),
                             ("max_features", 1, 512), ("n_conv_per_stage", 1, 4), ("n_attention_stages", 1, 7)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{name} must be a whole number within {lo}..{hi}, got {shown(value)}")
        for name in ("presence_head", "mask_prior"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {shown(getattr(self, name))}")
        if not isinstance(self.name, str) or not self.name.isprintable() or len(self.name) > 64:
            raise ValueError("name must be a short printable string")
        if self.max_features < self.base_features:
            raise ValueError(f"max_features {self.max_features} is below base_features {self.base_features}")
        if self.input_size % 2 ** (self.n_stages - 1):
            raise ValueError(
                f"input_size {self.input_size} must be divisible by 2**(n_stages-1) = "
                f"{2 ** (self.n_stages - 1)}"
            )
        if not 1 <= self.n_attention_stages <= self.n_stages:
            raise ValueError("n_attention_stages must be between 1 and n_stages")
        # Attention costs the square of its map's pixels: no finer map than the official network's
        # (224 px / 4 = 56 px, 3136 tokens); 256 px attention with 88 parameters was 4.5x its time.
        side = self.input_size // 2 ** (self.n_stages - self.n_attention_stages)
        if side > MAX_ATTENTION_SIDE:
            raise ValueError(f"attention runs on {side} x {side} px maps (input_size {self.input_size}, "
                             f"{self.n_attention_stages} of {self.n_stages} stages), finer than the official "
                             f"network's {MAX_ATTENTION_SIDE} px")

    def check_parameters(self) -> int:
        """The network's parameter count, found without allocating it (PyTorch's meta device);
        ValueError beyond the official network's (32.5 M): the bounds of ``validate`` alone allowed
        3.9 times as many. Returns the count."""
        with torch.device("meta"):
            n = sum(p.numel() for p in PAMNetwork(self).parameters())
        if n > MAX_PARAMETERS:
            raise ValueError(f"the network would have {n / 1e6:.1f} M parameters, more than the official network's "
                             f"{MAX_PARAMETERS / 1e6:.1f} M")
        return n


MAX_ATTENTION_SIDE = 56  # the official network's finest attention map (px)
MAX_PARAMETERS = 32_482_602  # the official network's parameters: the largest PAM there is


PRESETS: dict[str, PAMConfig] = {
    # The published network: 6 stages 32..512, 224 px, attention at 56/28/14/7 px. 32.5 M params.
    "official": PAMConfig(),
    # The shipped default: 5 stages 16..128, 128 px, attention at 32/16/8 px, object-present head.
    "small": PAMConfig(
        name="small",
        input_size=128,
        n_stages=5,
        base_features=16,
        max_features=128,
        n_attention_stages=3,
        presence_head=True,
    ),
}
# "small" with the guide mask as a second input channel of the image encoder (an ablation; see README).
PRESETS["small-prior"] = replace(PRESETS["small"], name="small-prior", mask_prior=True)


class CrossAttention(nn.Module):
    """Single-head cross-attention over flattened feature maps (PAM's fusion block).

    queries: query-slice features, keys: guiding-slice features, values: guiding-mask features.
    Parameter names (values, keys, queries, fc_out) follow the published checkpoint.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.values = nn.Linear(channels, channels, bias=False)
        self.keys = nn.Linear(channels, channels, bias=False)
        self.queries = nn.Linear(channels, channels, bias=False)
        self.fc_out = nn.Linear(channels, channels)

    def forward(self, query_feat: torch.Tensor, key_feat: torch.Tensor, value_feat: torch.Tensor) -> torch.Tensor:
        """query_feat (G, N, C, h, w); key_feat, value_feat (G, C, h, w) -> (G, N, C, h, w)."""
        g, n, c, h, w = query_feat.shape
        q = self.queries(query_feat.permute(0, 1, 3, 4, 2).reshape(g, n * h * w, c))
        k = self.keys(key_feat.flatten(2).transpose(1, 2))
        v = self.values(value_feat.flatten(2).transpose(1, 2))
        # Every query token attends to its own guide's tokens; stacking the N query slices of a
        # guide along the token axis is the same computation as N separate calls, and the fused
        # kernel never materialises the (hw x hw) map per slice.
        # 4D (batch, heads, tokens, channels) selects torch's fused CPU kernel; with 3D inputs
        # torch falls back to the math path that builds the whole attention map (2-3x slower,
        # and 0.8 GB more at batch 16 for the official preset's 56 x 56 stage).
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=1.0 / math.sqrt(c))[:, 0]
        out = self.fc_out(out)
        return out.reshape(g, n, h, w, c).permute(0, 1, 4, 2, 3)


class PresenceHead(nn.Module):
    """Object-present logit from the fused bottleneck features (mean and max pooled)."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(2 * channels, channels), nn.LeakyReLU(0.01), nn.Linear(channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        return self.fc(pooled)[:, 0]


@dataclass
class PAMOutput:
    logits: list[torch.Tensor]
    presence: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)


class InstanceNorm(nn.GroupNorm):
    """Instance normalisation computed as a GroupNorm with one group per channel.

    The same function as ``nn.InstanceNorm2d(C, affine=True)`` without running statistics (each
    sample's channel normalised over its pixels, then scaled and shifted per channel), with the
    same parameters (``weight``, ``bias`` of shape (C,)) and so the same checkpoint keys. Torch's
    instance norm on CPU runs as a batch norm over a reshaped input with the affine parameters
    repeated per sample; the group-norm kernel skips those copies, which made the default network
    about 10-15 % faster per slice at batch 1 (outputs equal within 1e-6; see the README's
    Benchmarks).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(num_features, num_features, eps=eps, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """In training as ``nn.GroupNorm``. In eval mode the same function, faster on the CPU:
        torch's group norm called directly (``F.group_norm``'s Python checks took about 8 us a layer),
        and channels-last maps of fewer than
        ``STRIDED_BELOW`` pixels normalised sample by sample as a batch norm over their (H*W, C) view.
        Below that size torch's channels-last group norm walks each channel at a stride of C floats
        (its "impl-1" in ATen's group_norm_kernel.cpp); the batch norm reads the same memory in order:
        4-10 times as fast on an Intel Xeon (128 x 16 x 16: 127 -> 27 us; 512 x 14 x 14: 399 -> 56 us,
        one thread), outputs within 1e-5; the whole network gained 0.5-3 % (session 45, README
        Benchmarks)."""
        if self.training or x.dim() != 4 or x.shape[2] * x.shape[3] < 2:  # (1 x 1 maps: a batch norm refuses them)
            return super().forward(x)
        n, c, h, w = x.shape
        if h * w >= STRIDED_BELOW or x.device.type != "cpu" or not x.is_contiguous(memory_format=torch.channels_last):
            return torch.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, torch.backends.cudnn.enabled)
        # (C, H, W) in channels-last order is a contiguous (H*W, C) matrix: batch norm with batch
        # statistics normalises each of its columns (one channel of the sample) over its H*W rows.
        maps = [F.batch_norm(x[i].permute(1, 2, 0).reshape(h * w, c), None, None, self.weight, self.bias,
                             training=True, eps=self.eps) for i in range(n)]
        out = maps[0] if n == 1 else torch.stack(maps)
        return out.reshape(n, h, w, c).permute(0, 3, 1, 2)


STRIDED_BELOW = 1024  # ATen's feature_map_threshold: smaller channels-last maps take the strided group norm


def _conv_kwargs(config: PAMConfig) -> dict:
    return dict(
        n_stages=config.n_stages,
        features_per_stage=config.features,
        conv_op=nn.Conv2d,
        kernel_sizes=3,
        strides=[1] + [2] * (config.n_stages - 1),
        n_conv_per_stage=config.n_conv_per_stage,
        conv_bias=True,
        norm_op=InstanceNorm,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
    )


class ProposingStage(nn.Module):
    def __init__(self, config: PAMConfig):
        super().__init__()
        config.validate()
        self.config = config
        kw = _conv_kwargs(config)
        unet = PlainConvUNet(
            input_channels=2 if config.mask_prior else 1,
            num_classes=2,
            n_conv_per_stage_decoder=config.n_conv_per_stage,
            deep_supervision=True,
            **kw,
        )
        # Registering encoder before decoder reproduces the published key order; the decoder
        # keeps its own reference to the encoder (the `decoder.encoder.*` aliases).
        self.encoder = unet.encoder
        self.decoder = unet.decoder
        self.mask_encoder = PlainConvEncoder(input_channels=1, return_skips=True, **kw)
        feats = config.features
        self.cross_attns = nn.ModuleList([CrossAttention(feats[s]) for s in config.attention_stages])
        self.presence_head = PresenceHead(feats[-1]) if config.presence_head else None

    def encode_guide(self, guide_image: torch.Tensor, guide_mask: torch.Tensor) -> tuple[list, list]:
        """Guide features for the attention stages: ([keys per stage], [values per stage])."""
        img_skips = self.encoder(torch.cat([guide_image, guide_mask], 1) if self.config.mask_prior else guide_image)
        mask_skips = self.mask_encoder(guide_mask)
        stages = self.config.attention_stages
        return [img_skips[s] for s in stages], [mask_skips[s] for s in stages]

    def decode_queries(self, query_images: torch.Tensor, guide_keys: list, guide_values: list,
                       guide_mask: torch.Tensor | None = None, query_prior: torch.Tensor | None = None) -> PAMOutput:
        """query_images (G, N, 1, S, S); with config.mask_prior each query's second channel is
        ``query_prior`` (G, N, 1, S, S; e.g. the guide's mask carried onto that slice by
        registration) or, without it, the guide mask (G, 1, S, S) itself."""
        g, n = query_images.shape[:2]
        x = query_images
        if self.config.mask_prior:
            if query_prior is not None:
                if query_prior.shape != query_images.shape:
                    raise ValueError(f"query_prior has shape {tuple(query_prior.shape)}, "
                                     f"the queries {tuple(query_images.shape)}")
                prior = query_prior.to(query_images.dtype)
            elif guide_mask is not None:
                prior = guide_mask[:, None].expand(g, n, *guide_mask.shape[1:])
            else:
                raise ValueError("this network needs a prior mask for the queries (query_prior or the guide mask)")
            x = torch.cat([query_images, prior], 2)
        elif query_prior is not None:
            raise ValueError(f"network {shown(self.config.name)} has no prior channel; pass no query_prior")
        skips = self.encoder(x.reshape(g * n, *x.shape[2:]))
        skips = list(skips)
        for attn, s, k, v in zip(self.cross_attns, self.config.attention_stages, guide_keys, guide_values):
            q = skips[s].reshape(g, n, *skips[s].shape[1:])
            skips[s] = _dense_batch_stride((q + attn(q, k, v)).reshape(g * n, *skips[s].shape[1:]))
        logits = self.decoder(skips)
        presence = self.presence_head(skips[-1]) if self.presence_head is not None else None
        return PAMOutput(logits=list(logits), presence=presence)

    def forward(self, guide_image, guide_mask, query_images, query_prior=None) -> PAMOutput:
        keys, values = self.encode_guide(guide_image, guide_mask)
        return self.decode_queries(query_images, keys, values, guide_mask, query_prior)


def _dense_batch_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, or for a single channels-last map whose batch stride is not that of a dense
    tensor (a batch of one reshaped from the attention's (G, N, ...) view keeps a stride of C there)
    the same view with that stride made dense. The values and their memory are unchanged (a size-1
    dimension's stride addresses nothing), but torch's ``cat`` sees the map as channels-last only
    with dense strides: otherwise the decoder's concatenations of the attended skips fell back to the
    plain layout (6 times as slow) and its next convolutions copied them back (session 44, README
    Benchmarks)."""
    if x.dim() != 4 or x.shape[0] != 1 or not x.is_contiguous(memory_format=torch.channels_last):
        return x
    c, h, w = x.shape[1:]
    dense = (c * h * w, 1, w * c, c)
    return x if x.stride() == dense else x.as_strided(x.shape, dense, x.storage_offset())


class PAMNetwork(nn.Module):
    """Top-level module; its state dict uses the published `proposing_stage.` prefix."""

    def __init__(self, config: PAMConfig | str = "official"):
        super().__init__()
        if isinstance(config, str):
            if config not in PRESETS:
                raise ValueError(f"unknown preset {shown(config)}; choose one of {', '.join(PRESETS)}")
            config = PRESETS[config]
        self.config = config
        self.proposing_stage = ProposingStage(config)

    def forward(self, guide_image, guide_mask, query_images, query_prior=None) -> PAMOutput:
        return self.proposing_stage(guide_image, guide_mask, query_images, query_prior)

    @torch.inference_mode()
    def predict(self, guide_image, guide_mask, query_images) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inference as PAM does it: every scale's logits upsampled to the input size and
        averaged, then softmax. Returns (foreground probability (G*N, S, S), presence prob or None)."""
        out = self.forward(guide_image, guide_mask, query_images)
        return fuse_scales(out.logits, self.config.input_size), (
            torch.sigmoid(out.presence) if out.presence is not None else None
        )

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def fuse_scales(logits: list[torch.Tensor], size: int, align_corners: bool = False) -> torch.Tensor:
    """Average of all scales' logits at full size -> foreground probability (B, size, size)
    (``align_corners``: how the coarser scales are upsampled; the authors' code aligns them)."""
    acc = None
    for lg in logits:
        # In the layer order a channels-last network leaves them, torch's bilinear upsampling of these
        # 2-channel maps took 3.5 times as long (about 170 against 45 us at 128 px on an Intel Xeon),
        # and the sums and softmax after it mixed both orders: in plain order it is the same
        # arithmetic (results equal within 1e-6); with the plain first-layer weights (checkpoints.
        # _for_inference) the default network is 4 % faster per slice at batch 1 (session 39,
        # README Benchmarks).
        lg = lg.contiguous()
        up = lg if lg.shape[-1] == size else F.interpolate(lg, size=(size, size), mode="bilinear",
                                                          align_corners=align_corners)
        acc = up if acc is None else acc + up
    return torch.softmax(acc / len(logits), dim=1)[:, 1]


def build_network(config: PAMConfig | str | dict = "official") -> PAMNetwork:
    if isinstance(config, dict):
        config = PAMConfig.from_dict(config)
    return PAMNetwork(config)
