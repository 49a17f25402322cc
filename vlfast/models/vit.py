"""Vision Transformer with timm's parameter names, so timm state dicts load as they are.

forward_features equals timm's VisionTransformer.forward_features (class token, absolute
position embeddings, pre-norm blocks, final norm). forward_masked runs the blocks on the
visible patches only (vlfast.ops.random_masking), as MAE and MAMO's masked image view do.
A position embedding for another grid is resampled on load (ALBEF trains at 256 px, fine-tunes
at 384).
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlfast.models.init import init_weights
from vlfast.ops import attention, random_masking


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 0  # > 0 adds timm's classifier `head`, so a classifier checkpoint loads strictly

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, config.width, config.patch_size, stride=config.patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, N, D)


class ViTAttention(nn.Module):
    """timm's Attention (its parameter names: qkv, proj) over vlfast.ops.attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=1e-6)
        self.attn = ViTAttention(config.width, config.heads)
        self.norm2 = nn.LayerNorm(config.width, eps=1e-6)
        self.mlp = Mlp(config.width, int(config.width * config.mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig = VisionConfig()):
        super().__init__()
        if config.image_size % config.patch_size or config.width % config.heads:
            raise ValueError(f"image_size must be a multiple of patch_size and width of heads: {config}")
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + config.grid ** 2, config.width) * 0.02)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width, eps=1e-6)
        self.head = nn.Linear(config.width, config.num_classes) if config.num_classes else nn.Identity()
        self.apply(init_weights)
        nn.init.normal_(self.cls_token, std=1e-6)
        self._register_load_state_dict_pre_hook(self._resample_pos_embed)

    def forward_features(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 1 + N, D) normalised tokens, [CLS] first."""
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self._encode(x)

    def forward_masked(self, images: Tensor, mask_ratio: float, generator: Optional[torch.Generator] = None):
        """Encode a random (1 − mask_ratio) of the patches per image: ((B, 1 + L, D) tokens, Masking)."""
        patches = self.patch_embed(images)
        masking = random_masking(patches, mask_ratio, pos_embed=self.pos_embed[:, 1:], generator=generator)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(patches.shape[0], -1, -1)
        return self._encode(torch.cat([cls, masking.visible], dim=1)), masking

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.forward_features(images)[:, 0])

    def _encode(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def _resample_pos_embed(self, state_dict, prefix, *args) -> None:
        key = prefix + "pos_embed"
        if key in state_dict and state_dict[key].shape != self.pos_embed.shape:
            state_dict[key] = resample_pos_embed(state_dict[key], self.config.grid)


def resample_pos_embed(pos_embed: Tensor, grid: int) -> Tensor:
    """(1, 1 + g·g, D) position embeddings of a g×g patch grid -> a grid×grid one, bicubic (as
    timm and ALBEF's interpolate_pos_embed); the [CLS] embedding is kept."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    old = math.isqrt(patches.shape[1])
    if old * old != patches.shape[1]:
        raise ValueError(f"pos_embed holds {patches.shape[1]} patch positions, not a square grid")
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)
    return torch.cat([cls, patches], dim=1)
