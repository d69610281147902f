"""Key mapping between our (official DINOv3/DINOv2) state dicts and Hugging Face `transformers` ones.

Official -> HF (transformers >= 5; older 4.x names are also read):
  cls_token                      -> embeddings.cls_token
  mask_token [1, D]              -> embeddings.mask_token ([1, 1, D] for DINOv3, [1, D] for DINOv2)
  storage_tokens | register_tokens -> embeddings.register_tokens
  pos_embed                      -> embeddings.position_embeddings                     (DINOv2)
  patch_embed.proj.*             -> embeddings.patch_embeddings.*  (DINOv3) | .patch_embeddings.projection.* (DINOv2)
  blocks.i.attn.qkv.{weight,bias} -> <layers>.i.attention.{q,k,v}_proj.*   (k bias dropped when masked: HF key_bias=False)
  blocks.i.attn.proj.*           -> <layers>.i.attention.o_proj.*
  blocks.i.ls{1,2}.gamma         -> <layers>.i.layer_scale{1,2}.lambda1
  blocks.i.mlp.fc1 / fc2         -> <layers>.i.mlp.up_proj / down_proj (DINOv3) | mlp.fc1 / fc2 (DINOv2)
  blocks.i.mlp.w1 / w2 / w3      -> <layers>.i.mlp.gate_proj / up_proj / down_proj
  blocks.i.mlp.w12 / w3          -> <layers>.i.mlp.gate_proj + up_proj (halves of w12) / down_proj   (DINOv2 ViT-g)
  norm                           -> norm (DINOv3) | layernorm (DINOv2)
  rope_embed.periods, qkv.bias_mask: buffers HF recomputes (not stored).
<layers> is `model.layer` for HF DINOv3 and `encoder.layer` for HF DINOv2.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor, nn

_HF_MARKERS = ("embeddings.cls_token", "embeddings.patch_embeddings.weight", "embeddings.patch_embeddings.projection.weight")


def is_hf_state_dict(sd: Mapping[str, Tensor]) -> bool:
    return any(k in sd for k in _HF_MARKERS)


def _is_dinov2(model: nn.Module) -> bool:
    return bool(getattr(model, "dinov2", False))


def to_hf_state_dict(sd: Mapping[str, Tensor], dinov2: bool, layer_prefix: str | None = None) -> dict[str, Tensor]:
    """Our state dict -> HF `DINOv3ViTModel` (dinov2=False) or `Dinov2Model`/`Dinov2WithRegistersModel` keys."""
    L = layer_prefix or ("encoder.layer" if dinov2 else "model.layer")
    out: dict[str, Tensor] = {}
    for key, v in sd.items():
        if key.endswith(("rope_embed.periods", "bias_mask")) or key.startswith(("cls_norm.", "local_cls_norm.")):
            continue
        if key == "cls_token":
            out["embeddings.cls_token"] = v
        elif key == "mask_token":
            out["embeddings.mask_token"] = v if dinov2 else v.reshape(1, 1, -1)
        elif key in ("storage_tokens", "register_tokens"):
            out["embeddings.register_tokens"] = v
        elif key == "pos_embed":
            out["embeddings.position_embeddings"] = v
        elif key.startswith("patch_embed.proj."):
            leaf = key.rsplit(".", 1)[1]
            out[f"embeddings.patch_embeddings.{'projection.' if dinov2 else ''}{leaf}"] = v
        elif key.startswith("norm."):
            out[("layernorm." if dinov2 else "norm.") + key[5:]] = v
        else:
            m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
            if m is None:
                raise KeyError(f"no HF name for key {key!r}")
            i, rest = m.groups()
            p = f"{L}.{i}."
            if rest.startswith("attn.qkv."):
                leaf = rest.rsplit(".", 1)[1]
                q, k, vv = v.chunk(3, dim=0)
                out[p + f"attention.q_proj.{leaf}"] = q
                masked = f"blocks.{i}.attn.qkv.bias_mask" in sd
                if leaf == "weight" or not masked:
                    out[p + f"attention.k_proj.{leaf}"] = k
                out[p + f"attention.v_proj.{leaf}"] = vv
            elif rest.startswith("attn.proj."):
                out[p + "attention.o_proj." + rest.rsplit(".", 1)[1]] = v
            elif rest in ("ls1.gamma", "ls2.gamma"):
                out[p + f"layer_scale{rest[2]}.lambda1"] = v
            elif rest.startswith(("norm1.", "norm2.")):
                out[p + rest] = v
            elif rest.startswith("mlp."):
                name, leaf = rest[4:].split(".")
                if name == "w12":
                    g, u = v.chunk(2, dim=0)
                    out[p + f"mlp.gate_proj.{leaf}"], out[p + f"mlp.up_proj.{leaf}"] = g, u
                else:
                    hf = {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"}.get(name)
                    if hf is None:
                        hf = name if dinov2 else {"fc1": "up_proj", "fc2": "down_proj"}[name]
                    out[p + f"mlp.{hf}.{leaf}"] = v
            else:
                raise KeyError(f"no HF name for key {key!r}")
    return out


# HF 4.x DINOv2 names -> 5.x names
_HF4_RENAMES = [
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
]


def from_hf_state_dict(sd: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """HF keys -> ours, for `model` (buffers and masked K biases are taken from the model itself)."""
    dinov2 = _is_dinov2(model)
    own = model.state_dict()
    rn: dict[str, Tensor] = {}
    for k, v in sd.items():
        for pat, rep in _HF4_RENAMES:
            k = re.sub(pat, rep, k)
        k = re.sub(r"^(model\.layer|encoder\.layer|layer)\.", "LAYER.", k)
        rn[k] = v
    out: dict[str, Tensor] = {}
    for k, v in rn.items():
        if k == "embeddings.cls_token":
            out["cls_token"] = v
        elif k == "embeddings.mask_token":
            out["mask_token"] = v.reshape(1, -1)
        elif k == "embeddings.register_tokens":
            if v.shape[1] > 0:
                out["register_tokens" if dinov2 else "storage_tokens"] = v
        elif k == "embeddings.position_embeddings":
            out["pos_embed"] = v
        elif k.startswith("embeddings.patch_embeddings."):
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith(("norm.", "layernorm.")):
            out["norm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("LAYER."):
            _, i, rest = k.split(".", 2)
            p = f"blocks.{i}."
            if rest.startswith("attention.q_proj."):
                leaf = rest.rsplit(".", 1)[1]
                q = v
                kk = rn.get(f"LAYER.{i}.attention.k_proj.{leaf}")
                vv = rn[f"LAYER.{i}.attention.v_proj.{leaf}"]
                if kk is None:  # HF key_bias=False: the K bias is zero (masked in our model)
                    kk = torch.zeros_like(q)
                out[p + f"attn.qkv.{leaf}"] = torch.cat((q, kk, vv), dim=0)
            elif rest.startswith(("attention.k_proj.", "attention.v_proj.")):
                continue
            elif rest.startswith("attention.o_proj."):
                out[p + "attn.proj." + rest.rsplit(".", 1)[1]] = v
            elif rest.startswith("layer_scale"):
                out[p + f"ls{rest[len('layer_scale')]}.gamma"] = v
            elif rest.startswith(("norm1.", "norm2.")):
                out[p + rest] = v
            elif rest.startswith("mlp."):
                name, leaf = rest[4:].split(".")
                if f"{p}mlp.w12.weight" in own:
                    if name == "gate_proj":
                        out[p + f"mlp.w12.{leaf}"] = torch.cat((v, rn[f"LAYER.{i}.mlp.up_proj.{leaf}"]), dim=0)
                    elif name == "down_proj":
                        out[p + f"mlp.w3.{leaf}"] = v
                    continue
                if f"{p}mlp.w1.weight" in own:
                    ours = {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"}[name]
                else:
                    ours = {"up_proj": "fc1", "down_proj": "fc2", "fc1": "fc1", "fc2": "fc2"}[name]
                out[p + f"mlp.{ours}.{leaf}"] = v
    # buffers that HF recomputes instead of storing
    for k, v in own.items():
        if k.endswith(("rope_embed.periods", "bias_mask")) and k not in out:
            out[k] = v.clone()
    return out


def _ffn_hidden(model: nn.Module) -> int:
    mlp = model.blocks[0].mlp
    for name in ("fc1", "w1", "w3"):
        if hasattr(mlp, name):
            lin = getattr(mlp, name)
            return lin.in_features if name == "w3" else lin.out_features
    raise ValueError("unknown FFN")


def hf_config_dict(model: nn.Module) -> dict:
    """Keyword arguments of the HF config that holds `model` (DINOv3ViTConfig, Dinov2Config or
    Dinov2WithRegistersConfig, named by the returned `model_type`). Options HF cannot represent raise ValueError."""
    c = model.cfg
    problems = []
    if c.untie_cls_and_patch_norms:
        problems.append("untie_cls_and_patch_norms (HF has one final norm)")
    if c.norm_layer == "rmsnorm":
        problems.append("norm_layer=rmsnorm (HF uses LayerNorm)")
    if not c.layerscale:
        problems.append("layerscale disabled (HF always applies LayerScale)")
    eps = {"layernorm": 1e-6, "layernormbf16": 1e-5, "rmsnorm": 1e-5}[c.norm_layer]
    common = dict(hidden_size=c.embed_dim, num_hidden_layers=c.depth, num_attention_heads=c.num_heads,
                  patch_size=c.patch_size, num_channels=c.in_chans, layer_norm_eps=eps,
                  layerscale_value=float(c.layerscale or 1.0))
    if _is_dinov2(model):
        if c.ffn_layer not in ("mlp", "swiglufused"):
            problems.append(f"ffn_layer={c.ffn_layer} in a DINOv2 model")
        if not (c.qkv_bias and c.proj_bias and c.ffn_bias):
            problems.append("DINOv2 HF models always have qkv/proj/ffn biases")
        if problems:
            raise ValueError("cannot express in HF: " + "; ".join(problems))
        out = dict(common, model_type="dinov2_with_registers" if c.n_storage_tokens else "dinov2",
                   image_size=c.img_size, mlp_ratio=int(c.ffn_ratio) if float(c.ffn_ratio).is_integer() else c.ffn_ratio, use_swiglu_ffn=c.ffn_layer == "swiglufused",
                   qkv_bias=True)
        if c.n_storage_tokens:
            out["num_register_tokens"] = c.n_storage_tokens
        return out
    if c.ffn_layer == "swiglufused":
        problems.append("ffn_layer=swiglufused in a DINOv3 model")
    if c.pos_embed_rope_base is None:
        problems.append("RoPE min/max periods (HF has rope_theta only)")
    if c.pos_embed_rope_normalize_coords != "separate":
        problems.append(f"pos_embed_rope_normalize_coords={c.pos_embed_rope_normalize_coords} (HF: separate)")
    if problems:
        raise ValueError("cannot express in HF: " + "; ".join(problems))
    gated = c.ffn_layer != "mlp"
    return dict(common, model_type="dinov3_vit", intermediate_size=_ffn_hidden(model), use_gated_mlp=gated,
                hidden_act="silu" if gated else "gelu", rope_theta=float(c.pos_embed_rope_base),
                num_register_tokens=c.n_storage_tokens, query_bias=c.qkv_bias, value_bias=c.qkv_bias,
                key_bias=c.qkv_bias and not c.mask_k_bias, proj_bias=c.proj_bias, mlp_bias=c.ffn_bias,
                pos_embed_shift=c.pos_embed_rope_shift_coords, pos_embed_jitter=c.pos_embed_rope_jitter_coords,
                pos_embed_rescale=c.pos_embed_rope_rescale_coords)
