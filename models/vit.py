"""Vision Transformer backbones (``vit_t`` ... ``vit_h``), state-dict compatible with insightface ``arcface_torch``.

Parameter and buffer names, shapes and the eval-mode forward match insightface's ``backbones/vit.py``, so its
released ViT weights load with ``load_state_dict(strict=True)``; the manifests in ``models/manifests/vit_*.json``
were written by insightface's own code. The architecture, for a ``(N, 3, 112, 112)`` input in [-1, 1]:

- ``patch_embed.proj``: a 9x9 stride-9 conv to ``embed_dim`` channels, so 12 x 12 = 144 patches (the last 4 pixel
  rows and columns are not seen, as in insightface), plus a learned ``pos_embed`` (no class token);
- ``blocks``: pre-norm transformer blocks, ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; attention has a
  bias-free ``qkv`` Linear (the 3 * embed_dim outputs ordered q, k, v, each split into heads) and a ``proj``; the
  MLP is ``fc1 -> ReLU6 -> fc2`` with 4 x embed_dim hidden units;
- ``norm`` (LayerNorm), the 144 tokens flattened, then ``feature``: Linear(144 * embed_dim, embed_dim, no bias),
  BatchNorm1d(eps 2e-5), Linear(embed_dim, num_features, no bias), BatchNorm1d(eps 2e-5).

Differences from insightface, none of which changes a weight or an eval-mode output:

- attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels where available); the
  maths, scale ``head_dim ** -0.5`` and weight layout are insightface's. insightface forces the attention matrix to
  float32 inside the model; here precision is the trainer's (under autocast the kernel runs in the autocast dtype).
- Patch masking (training only) uses the configured ``mask_ratio``. insightface's ``forward_features`` calls
  ``random_masking(x)`` without passing ``self.mask_ratio``, so every model with a non-zero ratio masks the default
  10 % of patches (insightface issues #2219 and #2291, open): its ``vit_b_dp005_mask_005`` and
  ``vit_l_dp005_mask_005`` really train with 10 % masked (15 of 144 patches), not the 5 % (8 patches) their names
  and configurations say. Here the name's ratio is the ratio used; ``mask_ratio=0.1`` reproduces insightface's
  training of those two models.
- ``gradient_checkpointing`` is an option (default off) instead of being fixed on for vit_b/l/h; the recipes set it.
- insightface's ``fp16`` handling and the ``hybrid_backbone`` / ``norm_layer="bn"`` paths (unused by its
  ``get_model``) are not reproduced.

Masking, as insightface does it: in training mode, ``int(L * (1 - mask_ratio))`` patches chosen uniformly at random
per sample (with ``torch.rand``, so the trainer's seed governs it) go through the blocks; after ``norm`` the
removed positions are filled with the learned ``mask_token`` and the 144 positions are flattened in their
original order for the ``feature`` head. Stochastic depth (``drop_path_rate``, growing linearly from 0 at the
first block to the rate at the last) drops a block's residual branch per sample, also in training only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.registry import BackboneOptionError, register_backbone

__all__ = ["Attention", "Block", "VisionTransformer"]

# insightface's embedding-head BatchNorm eps (the LayerNorms use PyTorch's default 1e-5).
FEATURE_BN_EPS = 2e-5


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero ``x`` for a random ``rate`` of the samples, scale the rest by ``1 / (1 - rate)``."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention with insightface's weights: ``qkv`` (no bias) and ``proj``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        # The qkv outputs are [q | k | v], each [head 0 | head 1 | ...]: (3, batch, heads, tokens, head_dim).
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """``fc1 -> ReLU6 -> fc2`` (insightface's activation choice)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth ``drop_path_rate`` on both residual branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path_rate: float) -> None:
        super().__init__()
        # Creation order fixes the state-dict order: insightface creates both norms first.
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches of an ``img_size`` square image, projected to ``embed_dim``."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not while tracing for ONNX: there the sizes are tensors, and the exported input is 112x112 by contract.
        if not torch.jit.is_tracing() and x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, num_patches, embed_dim)


class VisionTransformer(nn.Module):
    """ViT for 112x112 faces with insightface's layout; see the module docstring.

    ``mask_ratio``: the fraction of patches removed per sample in training mode (0 = off). ``drop_path_rate``: the
    stochastic-depth rate of the last block. ``gradient_checkpointing``: recompute each block in backward (training
    mode only). ``dropout`` must be 0: the architecture has no embedding dropout.
    """

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        img_size: int = 112,
        patch_size: int = 9,
        drop_path_rate: float = 0.0,
        mask_ratio: float = 0.0,
        num_features: int = 512,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if dropout != 0.0:
            raise BackboneOptionError(f"the ViT has no embedding dropout: network.dropout must be 0, got {dropout}")
        if not 0.0 <= mask_ratio < 1.0:
            raise BackboneOptionError(f"ViT mask_ratio must be in [0, 1), got {mask_ratio}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise BackboneOptionError(f"ViT drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.embed_dim = embed_dim
        self.num_features = num_features
        self.mask_ratio = mask_ratio
        self.gradient_checkpointing = gradient_checkpointing
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        # insightface's rates: float32 linspace, so the per-block rates are bit-identical to its.
        rates = torch.linspace(0.0, drop_path_rate, depth, device="cpu").tolist()

        # pos_embed before mask_token: the module's own parameters lead the state dict in creation order.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, rate) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=FEATURE_BN_EPS),
            nn.Linear(embed_dim, num_features, bias=False),
            nn.BatchNorm1d(num_features, eps=FEATURE_BN_EPS),
        )

        # insightface's init: truncated normals (std 0.02) for Linear weights and pos_embed, normal for the mask
        # token, zero Linear biases, LayerNorm at (1, 0); the patch conv keeps PyTorch's default.
        nn.init.normal_(self.mask_token, std=0.02)
        # Without masking the mask token takes no part in the forward: frozen, it is no unused parameter for DDP
        # (insightface needs find_unused_parameters=True for its mask-free ViTs) and gets no weight decay.
        self.mask_token.requires_grad_(mask_ratio > 0.0)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, 3, 112, 112)`` normalised RGB images to ``(N, num_features)`` embeddings."""
        x = self.patch_embed(x) + self.pos_embed
        batch, tokens, dim = x.shape
        masking = self.training and self.mask_ratio > 0.0
        if masking:
            # Keep the int(L * (1 - ratio)) patches with the smallest noise (insightface's rule and rounding).
            num_keep = int(tokens * (1.0 - self.mask_ratio))
            keep = torch.rand(batch, tokens, device=x.device).argsort(dim=1)[:, :num_keep]
            keep = keep.unsqueeze(-1).expand(-1, -1, dim)
            x = x.gather(1, keep)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        x = self.norm(x)
        if masking:
            # The kept tokens back at their positions, the mask token at the removed ones (gradients reach both).
            x = self.mask_token.to(x.dtype).expand(batch, tokens, dim).scatter(1, keep, x)
        return self.feature(x.reshape(batch, tokens * dim))


def _register_vit(name: str, embed_dim: int, depth: int, drop_path_rate: float, mask_ratio: float) -> None:
    def factory(**kwargs: Any) -> VisionTransformer:
        options: dict[str, Any] = {
            "embed_dim": embed_dim,
            "depth": depth,
            "drop_path_rate": drop_path_rate,
            "mask_ratio": mask_ratio,
        }
        return VisionTransformer(**(options | kwargs))

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (
        f"insightface's ``{name}``: embed_dim {embed_dim}, depth {depth}, 8 heads, drop path {drop_path_rate}, "
        f"mask ratio {mask_ratio}; other VisionTransformer arguments may be given."
    )
    register_backbone(name)(factory)


# insightface get_model's ViTs (all 8 heads, 9x9 patches); the WebFace42M variants differ only in drop path and mask.
_register_vit("vit_t", embed_dim=256, depth=12, drop_path_rate=0.1, mask_ratio=0.1)
_register_vit("vit_t_dp005_mask0", embed_dim=256, depth=12, drop_path_rate=0.05, mask_ratio=0.0)
_register_vit("vit_s", embed_dim=512, depth=12, drop_path_rate=0.1, mask_ratio=0.1)
_register_vit("vit_s_dp005_mask_0", embed_dim=512, depth=12, drop_path_rate=0.05, mask_ratio=0.0)
_register_vit("vit_b", embed_dim=512, depth=24, drop_path_rate=0.1, mask_ratio=0.1)
_register_vit("vit_b_dp005_mask_005", embed_dim=512, depth=24, drop_path_rate=0.05, mask_ratio=0.05)
_register_vit("vit_l_dp005_mask_005", embed_dim=768, depth=24, drop_path_rate=0.05, mask_ratio=0.05)
_register_vit("vit_h", embed_dim=1024, depth=48, drop_path_rate=0.1, mask_ratio=0.0)
