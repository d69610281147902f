"""CLS-to-patch attention of the last block, recomputed from the tokens that enter it.

The model's attention runs through `scaled_dot_product_attention`, which never materialises the attention matrix, so
the last block's attention is recomputed here: tokens entering the last block -> norm1 -> fused qkv -> RoPE on q and k
(the model's own tables, identity rows for cls + storage; none for DINOv2) -> softmax(q k^T / sqrt(d_head)), row 0.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from dinobridge.models.rope import apply_rope


@torch.no_grad()
def last_block_input(model: nn.Module, x: Tensor) -> tuple[Tensor, int, int, Optional[tuple[Tensor, Tensor]]]:
    """Image batch [B, 3, H, W] -> (tokens entering the last block [B, 1 + R + h*w, D], h, w, RoPE tables or None).

    The model must be in eval mode (no RoPE coordinate augmentation, no patch drop).
    """
    t, h, w = model.prepare_tokens(x)
    rope = None
    if getattr(model, "rope_embed", None) is not None:
        rope = model.rope_embed(h, w, n_prefix=1 + model.n_storage_tokens)
    for blk in model.blocks[:-1]:
        t = blk(t, rope)
    return t, h, w, rope


@torch.no_grad()
def cls_attention(model: nn.Module, x: Tensor) -> Tensor:
    """Normalised images [B, 3, H, W] -> CLS-to-patch attention of the last block [B, heads, h, w] (float32).

    Each head's row sums to <= 1 over the patches; the remainder is the attention to cls and storage tokens.
    """
    if model.training:
        raise ValueError("cls_attention: put the model in eval mode first (model.eval())")
    t, h, w, rope = last_block_input(model, x)
    last = model.blocks[-1]
    attn = last.attn
    B, N, D = t.shape
    heads = attn.num_heads
    y = last.norm1(t)
    q, k, _ = attn.qkv(y).reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4).unbind(0)  # [B, heads, N, Dh]
    if rope is not None:
        sin, cos = rope  # [N, Dh], identity rows for the prefix
        q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
    q0 = q[:, :, :1].float()  # only the CLS query is needed
    logits = (q0 @ k.float().transpose(-2, -1)) * (D // heads) ** -0.5  # [B, heads, 1, N]
    probs = logits.softmax(dim=-1)[:, :, 0]  # [B, heads, N]
    prefix = N - h * w
    return probs[:, :, prefix:].reshape(B, heads, h, w)
