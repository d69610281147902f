"""Building blocks of the ViT: patch embedding, norms, LayerScale, FFNs, attention with RoPE, the transformer block.

Parameter names match the official DINOv3 / DINOv2 checkpoints (`qkv`, `proj`, `ls1.gamma`, `mlp.fc1`, `mlp.w1` ...).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinobridge.models.rope import apply_rope

RopeTables = Optional[tuple[Tensor, Tensor]]


# ---------------------------------------------------------------- embedding, norms, layerscale
class PatchEmbed(nn.Module):
    """Image [B, C, H, W] -> patch tokens [B, H/p * W/p, D] (Conv2d with kernel = stride = p)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.proj.in_channels * self.patch_size**2)
        nn.init.uniform_(self.proj.weight, -bound, bound)
        nn.init.uniform_(self.proj.bias, -bound, bound)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {p}")
        x = self.proj(x)  # [B, D, H/p, W/p]
        return x.flatten(2).transpose(1, 2), H // p, W // p


class RMSNorm(nn.Module):
    """RMS normalisation computed in fp32; weight [D]."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "layernorm": lambda d: nn.LayerNorm(d, eps=1e-6),
    "layernormbf16": lambda d: nn.LayerNorm(d, eps=1e-5),  # official name; a plain LayerNorm with eps 1e-5
    "rmsnorm": lambda d: RMSNorm(d, eps=1e-5),
}


def make_norm(name: str, dim: int) -> nn.Module:
    if name not in NORM_LAYERS:
        raise ValueError(f"norm_layer: expected one of {sorted(NORM_LAYERS)}, got {name!r}")
    return NORM_LAYERS[name](dim)


class LayerScale(nn.Module):
    """x * gamma, gamma [D] initialised to `init_values`."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


# ---------------------------------------------------------------- FFNs
class Mlp(nn.Module):
    """fc1 (D -> hidden) - GELU - fc2 (hidden -> D)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def swiglu_hidden_dim(hidden: int, align_to: int) -> int:
    """Official SwiGLU width: int(hidden * 2/3) rounded up to a multiple of `align_to`."""
    d = int(hidden * 2 / 3)
    return d + (-d % align_to)


class SwiGLUFFN(nn.Module):
    """DINOv3 SwiGLU: w3(silu(w1 x) * w2 x); hidden = swiglu_hidden_dim(int(r * D), align)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True, align_to: int = 8) -> None:
        super().__init__()
        d = swiglu_hidden_dim(hidden, align_to)
        self.w1 = nn.Linear(dim, d, bias=bias)
        self.w2 = nn.Linear(dim, d, bias=bias)
        self.w3 = nn.Linear(d, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class SwiGLUFFNFused(nn.Module):
    """DINOv2 (ViT-g) SwiGLU with fused gate/up weight `w12` [2d, D]; d = (int(hidden * 2/3) + 7) // 8 * 8."""

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        d = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * d, bias=bias)
        self.w3 = nn.Linear(d, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


FFN_ALIGN = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}
FFN_LAYERS = ("mlp", *FFN_ALIGN, "swiglufused")


def make_ffn(name: str, dim: int, ratio: float, bias: bool) -> nn.Module:
    hidden = int(dim * ratio)
    if name == "mlp":
        return Mlp(dim, hidden, bias)
    if name in FFN_ALIGN:
        return SwiGLUFFN(dim, hidden, bias, FFN_ALIGN[name])
    if name == "swiglufused":
        return SwiGLUFFNFused(dim, hidden, bias)
    raise ValueError(f"ffn_layer: expected one of {list(FFN_LAYERS)}, got {name!r}")


# ---------------------------------------------------------------- attention
class LinearKMaskedBias(nn.Linear):
    """Fused qkv Linear whose K-bias is masked to zero by the persistent buffer `bias_mask` (1 | 0 | 1 over q|k|v)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("bias_mask", torch.empty(out_features), persistent=True)
        self.reset_bias_mask()

    @torch.no_grad()
    def reset_bias_mask(self) -> None:
        third = self.out_features // 3
        self.bias_mask.fill_(1.0)
        self.bias_mask[third : 2 * third] = 0.0

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias * self.bias_mask.to(self.bias.dtype)
        return F.linear(x, self.weight, bias)


class Attention(nn.Module):
    """Multi-head self-attention with RoPE on the patch tokens of q and k (prefix tokens are not rotated).

    x [B, N, D] -> [B, N, D]; RoPE tables (sin, cos) have shape [M, D_head] or [B, 1, M, D_head]. With M = N they
    cover every token (identity rows for the prefix); with M < N the first N - M tokens (cls + storage) are skipped.
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True, mask_k_bias: bool = False
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        linear = LinearKMaskedBias if (mask_k_bias and qkv_bias) else nn.Linear
        self.qkv = linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, rope: RopeTables = None) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            sin, cos = rope
            p = N - sin.shape[-2]
            if p == 0:  # tables cover the whole sequence (identity rows for the prefix): no slicing
                q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
            else:
                q, k = (torch.cat((t[:, :, :p], apply_rope(t[:, :, p:], sin, cos)), dim=2) for t in (q, k))
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


# ---------------------------------------------------------------- block
class _TakeRows(torch.autograd.Function):
    """x[idx] for distinct row indices, with a backward that scatters (index_copy) instead of accumulating.

    Autograd's own backward of x[idx] is an atomic index_add, slow on bf16 CUDA tensors; rows are distinct here
    (a prefix of a random permutation), so a plain scatter gives the same gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, idx: Tensor) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.n_rows = x.shape[0]
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (idx,) = ctx.saved_tensors
        return grad.new_zeros((ctx.n_rows, *grad.shape[1:])).index_copy_(0, idx, grad), None


def _add_to_rows(x: Tensor, idx: Tensor, rows: Tensor, update: Tensor) -> Tensor:
    """x with rows idx replaced by rows + update (rows = x[idx] taken with `_TakeRows`): the same values as
    index_add(x, 0, idx, update), with no atomic accumulation in forward or backward (idx distinct)."""
    return x.index_copy(0, idx, rows + update)


def _residual(x: Tensor, branch: Callable[[Tensor, Optional[Tensor]], Tensor], drop_rate: float, training: bool) -> Tensor:
    """x + branch(x), with batch-subset stochastic depth at train time (DINOv2/v3 style).

    A random subset of max(int(B * (1 - p)), 1) samples goes through the branch (called as branch(x[idx], idx));
    its output is added back scaled by B / subset.
    """
    if not training or drop_rate <= 0.0:
        return x + branch(x, None)
    b = x.shape[0]
    keep = max(int(b * (1 - drop_rate)), 1)
    idx = torch.randperm(b, device=x.device)[:keep]
    rows = _TakeRows.apply(x, idx)
    return _add_to_rows(x, idx, rows, branch(rows, idx).to(x.dtype) * (b / keep))


class SelfAttentionBlock(nn.Module):
    """Pre-norm block: x = x + ls1(attn(norm1(x))); x = x + ls2(mlp(norm2(x))).

    `forward` takes one tensor [B, N, D] or a list of tensors of different N (crops of different sizes); for a list,
    attention runs per element and the FFN runs once on all tokens concatenated.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        mask_k_bias: bool = False,
        norm_layer: str = "layernorm",
        layerscale_init: Optional[float] = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = make_norm(norm_layer, dim)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, mask_k_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = make_norm(norm_layer, dim)
        self.mlp = make_ffn(ffn_layer, dim, ffn_ratio, ffn_bias)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path = drop_path

    def _attn_branch(self, x: Tensor, rope: RopeTables) -> Tensor:
        def branch(y: Tensor, idx: Optional[Tensor]) -> Tensor:
            r = rope
            if r is not None and idx is not None and r[0].dim() == 4:  # per-sample tables (patch_drop)
                r = (r[0][idx], r[1][idx])
            return self.ls1(self.attn(self.norm1(y), r))

        return _residual(x, branch, self.drop_path, self.training)

    def _ffn(self, x: Tensor, idx: Optional[Tensor] = None) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor | list[Tensor], rope: RopeTables | Sequence[RopeTables] = None) -> Tensor | list[Tensor]:
        if isinstance(x, Tensor):
            x = self._attn_branch(x, rope)
            return _residual(x, self._ffn, self.drop_path, self.training)
        ropes = [None] * len(x) if rope is None else list(rope)  # one (sin, cos) per list element
        if len(ropes) != len(x):
            raise ValueError(f"got {len(x)} inputs but {len(ropes)} RoPE tables")
        xs = [self._attn_branch(xi, ri) for xi, ri in zip(x, ropes)]
        if len(xs) == 1:
            return [_residual(xs[0], self._ffn, self.drop_path, self.training)]
        # FFN once over the tokens of all list elements (same weights, fewer kernel launches).
        if self.training and self.drop_path > 0:
            subsets = []
            for xi in xs:
                b = xi.shape[0]
                keep = max(int(b * (1 - self.drop_path)), 1)
                subsets.append(torch.randperm(b, device=xi.device)[:keep])
            inputs = [_TakeRows.apply(xi, idx) for xi, idx in zip(xs, subsets)]
        else:
            subsets, inputs = None, xs
        flat = torch.cat([t.flatten(0, 1) for t in inputs])
        outs = self._ffn(flat).split([t.shape[0] * t.shape[1] for t in inputs])
        result = []
        for i, (xi, oi) in enumerate(zip(xs, outs)):
            oi = oi.view(inputs[i].shape)
            if subsets is None:
                result.append(xi + oi)
            else:
                result.append(_add_to_rows(xi, subsets[i], inputs[i], oi.to(xi.dtype) * (xi.shape[0] / oi.shape[0])))
        return result
