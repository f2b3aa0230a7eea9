"""Forward multiply-accumulates of a backbone, for model FLOP utilisation (MFU) and the model table.

What is counted: every matrix product and convolution the forward pass dispatches to ATen, as PyTorch's
``torch.utils.flop_counter`` sees them (its FLOPs halved into multiply-accumulates): convolutions (grouped and
depthwise ones at their real cost), ``nn.Linear`` layers, and the two attention products of a ViT block,
``q @ k^T`` and ``attn @ v`` (``2 * tokens^2 * embed_dim`` MACs per block), whether they run inside
``scaled_dot_product_attention`` or as plain matmuls. Not counted: normalisation, activations, softmax, additions,
pooling and the embedding's BatchNorm (well under 1 % of any backbone here). One MAC is two FLOPs; a training step
costs about three forward passes (six FLOPs per MAC), more with gradient checkpointing.

The counts agree with insightface's published figures (ptflops for conv/linear plus its ``extra_gflops`` for
attention): r50 6.3 G, r100 12.1 G, mbf 0.45 G, ViT-T 1.5 G, ViT-S 5.7 G, ViT-B 11.4 G, ViT-L 25.3 G.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops"]


def count_flops(model: nn.Module, image_size: int = 112) -> int:
    """Forward multiply-accumulates (MACs) for one ``image_size`` RGB image, in eval mode (no patch masking).

    Runs the model on meta tensors, so it costs no compute and leaves the model's weights, buffers and mode as
    they were; it works on a model built on the meta device too.
    """
    meta_state = {name: torch.empty_like(t, device="meta") for name, t in model.state_dict(keep_vars=True).items()}
    image = torch.empty(1, 3, image_size, image_size, device="meta")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            torch.func.functional_call(model, meta_state, (image,))
    finally:
        model.train(was_training)
    flops = counter.get_total_flops()
    # Every op counted is a product of multiply-accumulates: its FLOPs are even.
    return flops // 2
