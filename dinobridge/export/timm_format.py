"""timm layout: a `.pth` / `.safetensors` file with timm-native keys, loaded through a named timm model.

    model = timm.create_model("vit_large_patch16_dinov3_qkvb", pretrained=True,
                              pretrained_cfg_overlay=dict(file="teacher_timm.pth"), **kwargs)

DINOv3 backbones (RoPE) map to timm's `Eva` models `vit_*_patch16_dinov3[_qkvb]`; DINOv2 backbones (learned position
embedding) to `VisionTransformer` models `vit_*_patch14[_reg4]_dinov2`. The named model whose defaults need the fewest
size overrides (embed_dim, depth, num_heads), then the fewest overrides in all, is chosen; the overrides
(`embed_dim`, `mlp_ratio`, `swiglu_mlp`, `norm_layer`, `in_chans`, `img_size`, ...) are part of the returned
`TimmSpec` and must be passed to `timm.create_model` (`TimmSpec.code(path)` prints the call). The file holds timm-native keys (what timm's
checkpoint filters produce from official files), so it loads whether or not the filter recognises it:

  Eva:  storage_tokens -> reg_token, ls{1,2}.gamma -> gamma_{1,2}, qkv.bias -> q_bias + v_bias (timm fixes the K bias
        at 0), mlp.w1/w2/w3 -> mlp.fc1_g/fc1_x/fc2; mask_token, rope periods, bias_mask, local_cls_norm dropped.
  ViT:  register_tokens -> reg_token, with registers cls_token += pos_embed[:, 0] and pos_embed loses its cls row
        (timm's no_embed_class), mlp.w12/w3 -> mlp.fc1/fc2; mask_token dropped.
Missing proj / FFN biases (proj_bias=False, ffn_bias=False) are written as zeros and a missing LayerScale
(layerscale: null) as ones: timm always has them.

Refused (timm cannot express them): untie_cls_and_patch_norms, RoPE min/max periods or normalize_coords other than
'separate', a nonzero K bias with mask_k_bias=False (Eva), fused SwiGLU in a RoPE model, non-fused SwiGLU in a
DINOv2 model.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from dinobridge.export.common import ExportError, check_output_file, cpu_copy, dropped_keys_note, save_tensors

_EPS = {"layernorm": 1e-6, "layernormbf16": 1e-5, "rmsnorm": 1e-5}

# Defaults of timm's named DINOv3 (Eva, timm/models/eva.py) and DINOv2 (timm/models/vision_transformer.py) models
# that matter for the weights. ffn: (kind, mlp_ratio, swiglu_align_to).
_EVA_COMMON = dict(patch_size=16, num_reg_tokens=4, norm=("layernorm", 1e-5),
                   rope_temperature=100.0, in_chans=3)
_EVA_NAMED: dict[str, dict[str, Any]] = {}
for _size, (_d, _depth, _h, _ffn, _qkvb) in {
    "tiny": (192, 12, 3, ("mlp", 4.0, 0), (True,)),
    "small": (384, 12, 6, ("mlp", 4.0, 0), (False, True)),
    "small_plus": (384, 12, 6, ("swiglu", 4.0, 8), (False, True)),
    "base": (768, 12, 12, ("mlp", 4.0, 0), (False, True)),
    "large": (1024, 24, 16, ("mlp", 4.0, 0), (False, True)),
    "huge_plus": (1280, 32, 20, ("swiglu", 4.0, 8), (False, True)),
    "7b": (4096, 40, 32, ("swiglu", 2.0, 64), (False,)),
}.items():
    for _b in _qkvb:
        _EVA_NAMED[f"vit_{_size}_patch16_dinov3{'_qkvb' if _b else ''}"] = dict(
            _EVA_COMMON, embed_dim=_d, depth=_depth, num_heads=_h, qkv_bias=_b, ffn=_ffn)

_VIT_COMMON = dict(patch_size=14, img_size=518, norm=("layernorm", 1e-6), qkv_bias=True, in_chans=3)
_VIT_NAMED: dict[str, dict[str, Any]] = {}
for _size, (_d, _depth, _h, _ffn) in {
    "small": (384, 12, 6, ("mlp", 4.0, 0)),
    "base": (768, 12, 12, ("mlp", 4.0, 0)),
    "large": (1024, 24, 16, ("mlp", 4.0, 0)),
    "giant": (1536, 40, 24, ("swiglufused", 2.66667 * 2, 0)),
}.items():
    for _r in (0, 4):
        _VIT_NAMED[f"vit_{_size}_patch14{'_reg4' if _r else ''}_dinov2"] = dict(
            _VIT_COMMON, embed_dim=_d, depth=_depth, num_heads=_h, num_reg_tokens=_r, ffn=_ffn)


@dataclass
class TimmSpec:
    """A timm model name plus the keyword overrides that make it hold our backbone.

    `kwargs` are Python objects for `timm.create_model`; `kwargs_code` the same as Python source (for printing).
    `family` is "eva" (DINOv3, RoPE) or "vit" (DINOv2, learned position embedding).
    """

    name: str
    family: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    kwargs_code: dict[str, str] = field(default_factory=dict)

    def set(self, key: str, value: Any, code: Optional[str] = None) -> None:
        self.kwargs[key] = value
        self.kwargs_code[key] = repr(value) if code is None else code

    def create_model(self, path: Optional[str | os.PathLike] = None, **extra: Any) -> nn.Module:
        """`timm.create_model` with the exported file at `path` (or random weights without it)."""
        timm = _timm()
        kw = {**self.kwargs, **extra}
        if path is None:
            return timm.create_model(self.name, pretrained=False, **kw)
        return timm.create_model(self.name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw)

    def code(self, path: str | os.PathLike) -> str:
        """The `timm.create_model(...)` call that loads the exported file, as Python source."""
        args = [repr(self.name), "pretrained=True", f"pretrained_cfg_overlay=dict(file={str(path)!r})"]
        args += [f"{k}={v}" for k, v in self.kwargs_code.items()]
        return f"timm.create_model({', '.join(args)})"


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ExportError("--format timm needs the timm package (pip install timm)") from None
    return timm


# ---------------------------------------------------------------------- architecture -> timm model
def _ffn(model: nn.Module) -> tuple[str, int]:
    """(kind, hidden width): mlp (fc1 width), swiglu (w1 width) or swiglufused (w3 input width)."""
    mlp = model.blocks[0].mlp
    if hasattr(mlp, "w12"):
        return "swiglufused", mlp.w3.in_features
    if hasattr(mlp, "w1"):
        return "swiglu", mlp.w1.out_features
    return "mlp", mlp.fc1.out_features


def _timm_hidden(dim: int, ratio: float, align: int) -> int:
    """timm's FFN width: int(dim * mlp_ratio), rounded up to a multiple of `align` (SwiGLU with align_to)."""
    h = int(dim * ratio)
    return h + (-h % align) if align else h


def _fit_ratio(dim: int, hidden: int, align: int) -> Optional[float]:
    """An mlp_ratio for which timm builds exactly `hidden` (None if there is none with this alignment)."""
    for r in (hidden / dim, (hidden + 0.5) / dim):
        if _timm_hidden(dim, r, align) == hidden:
            return r
    return None


def _problems(model: nn.Module) -> list[str]:
    c = model.cfg
    out = []
    if c.untie_cls_and_patch_norms:
        out.append("untie_cls_and_patch_norms (timm has one final norm for all tokens)")
    kind, _ = _ffn(model)
    if model.dinov2:
        if kind == "swiglu":
            out.append(f"ffn_layer={c.ffn_layer} in a DINOv2 model (timm's DINOv2 ViTs have MLP or fused SwiGLU)")
        return out
    if kind == "swiglufused":
        out.append("ffn_layer=swiglufused in a DINOv3 (RoPE) model (timm's Eva has split SwiGLU weights)")
    if c.pos_embed_rope_base is None:
        out.append("RoPE min/max periods (timm's Eva takes rope_temperature, i.e. pos_embed_rope_base, only)")
    if c.pos_embed_rope_normalize_coords != "separate":
        out.append(f"pos_embed_rope_normalize_coords={c.pos_embed_rope_normalize_coords} (timm's Eva uses separate)")
    if c.qkv_bias and not c.mask_k_bias and not model.blocks[0].attn.qkv.bias.is_meta:
        d = model.embed_dim
        if any(b.attn.qkv.bias[d:2 * d].abs().max() > 0 for b in model.blocks):
            out.append("mask_k_bias=False with a nonzero K bias (timm's Eva fixes the K bias at 0)")
    return out


def _required(model: nn.Module) -> dict[str, Any]:
    c = model.cfg
    req = dict(patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads,
               qkv_bias=bool(c.qkv_bias), num_reg_tokens=c.n_storage_tokens,
               norm=(c.norm_layer if c.norm_layer == "rmsnorm" else "layernorm", _EPS[c.norm_layer]),
               in_chans=c.in_chans, ffn=_ffn(model))
    if model.dinov2:
        req["img_size"] = c.img_size
    else:
        req["rope_temperature"] = float(c.pos_embed_rope_base)
    return req


def _norm_override(spec: TimmSpec, norm: tuple[str, float]) -> None:
    import timm.layers as L

    kind, eps = norm
    if kind == "rmsnorm":  # ours computes in fp32
        spec.set("norm_layer", functools.partial(L.RmsNormFp32, eps=eps),
                 f"functools.partial(timm.layers.RmsNormFp32, eps={eps!r})")
    elif eps == 1e-6:  # timm.layers.LayerNorm defaults to eps 1e-6
        spec.set("norm_layer", L.LayerNorm, "timm.layers.LayerNorm")
    else:
        spec.set("norm_layer", functools.partial(L.LayerNorm, eps=eps),
                 f"functools.partial(timm.layers.LayerNorm, eps={eps!r})")


def _ffn_override(spec: TimmSpec, dim: int, want: tuple[str, int], have: tuple[str, float, int]) -> None:
    kind, hidden = want
    h_kind, h_ratio, h_align = have
    if kind == "mlp":
        if h_kind != "mlp":
            if spec.family == "eva":
                spec.set("swiglu_mlp", False)
            else:
                import timm.layers as L

                spec.set("mlp_layer", L.Mlp, "timm.layers.Mlp")
                spec.set("act_layer", nn.GELU, "torch.nn.GELU")
        if _timm_hidden(dim, h_ratio, 0) != hidden:
            spec.set("mlp_ratio", _fit_ratio(dim, hidden, 0))
    elif kind == "swiglu":  # Eva: split SwiGLU (fc1_g, fc1_x) needs a nonzero swiglu_align_to
        if h_kind != "swiglu":
            spec.set("swiglu_mlp", True)
        if h_kind == "swiglu" and _timm_hidden(dim, h_ratio, h_align) == hidden:
            return
        align = h_align if h_kind == "swiglu" and _fit_ratio(dim, hidden, h_align) is not None else 8
        ratio = _fit_ratio(dim, hidden, align)
        if ratio is None:
            raise ExportError(f"ffn hidden width {hidden} cannot be built by timm's SwiGLU (not a multiple of 8)")
        if align != h_align:
            spec.set("swiglu_align_to", align)
        if _timm_hidden(dim, h_ratio, align) != hidden:
            spec.set("mlp_ratio", ratio)
    else:  # swiglufused (DINOv2 ViT-g): SwiGLUPacked, fc1 holds gate and value, width 2 * hidden
        if h_kind != "swiglufused":
            import timm.layers as L

            spec.set("mlp_layer", L.SwiGLUPacked, "timm.layers.SwiGLUPacked")
            spec.set("act_layer", nn.SiLU, "torch.nn.SiLU")
        if _timm_hidden(dim, h_ratio, 0) != 2 * hidden:
            spec.set("mlp_ratio", _fit_ratio(dim, 2 * hidden, 0))


def _spec_for(name: str, named: dict[str, Any], req: dict[str, Any], family: str) -> TimmSpec:
    spec = TimmSpec(name=name, family=family)
    simple = ["patch_size", "embed_dim", "depth", "num_heads", "qkv_bias", "in_chans"]
    simple += ["img_size"] if family == "vit" else ["rope_temperature"]
    for key in simple:
        if req[key] != named[key]:
            spec.set(key, req[key])
    if req["num_reg_tokens"] != named["num_reg_tokens"]:
        if family == "eva":
            spec.set("num_reg_tokens", req["num_reg_tokens"])
        else:
            spec.set("reg_tokens", req["num_reg_tokens"])
            spec.set("no_embed_class", req["num_reg_tokens"] > 0)
    if req["norm"] != named["norm"]:
        _norm_override(spec, req["norm"])
    _ffn_override(spec, req["embed_dim"], req["ffn"], named["ffn"])
    return spec


def timm_spec(model: nn.Module) -> TimmSpec:
    """The timm model (name + overrides) that holds `model`; ExportError naming what timm cannot represent."""
    problems = _problems(model)
    if problems:
        raise ExportError("cannot express in timm: " + "; ".join(problems))
    req = _required(model)
    family, named = ("vit", _VIT_NAMED) if model.dinov2 else ("eva", _EVA_NAMED)
    specs = [_spec_for(name, defaults, req, family) for name, defaults in named.items()]
    # fewest size overrides, then fewest overrides; ties: table order
    return min(specs, key=lambda s: (len({"embed_dim", "depth", "num_heads"} & set(s.kwargs)), len(s.kwargs)))


# ---------------------------------------------------------------------- weights
def _eva_key(key: str) -> Optional[str]:
    if key.endswith(("rope_embed.periods", "bias_mask")) or key == "mask_token":
        return None
    if key.startswith(("local_cls_norm.", "cls_norm.")):
        return None
    if key == "storage_tokens":
        return "reg_token"
    for ours, theirs in ((".ls1.gamma", ".gamma_1"), (".ls2.gamma", ".gamma_2"), (".mlp.w1.", ".mlp.fc1_g."),
                         (".mlp.w2.", ".mlp.fc1_x."), (".mlp.w3.", ".mlp.fc2.")):
        if ours in key:
            return key.replace(ours, theirs)
    return key


def _vit_key(key: str) -> Optional[str]:
    if key in ("mask_token",) or key.startswith(("local_cls_norm.", "cls_norm.")):
        return None
    if key == "register_tokens":
        return "reg_token"
    for ours, theirs in ((".mlp.w12.", ".mlp.fc1."), (".mlp.w3.", ".mlp.fc2.")):
        if ours in key:
            return key.replace(ours, theirs)
    return key


def timm_state_dict(model: nn.Module, spec: Optional[TimmSpec] = None) -> dict[str, Tensor]:
    """timm-native tensors for `model`, checked key by key and shape by shape against the timm model of `spec`."""
    spec = spec or timm_spec(model)
    sd = model.state_dict()
    out: dict[str, Tensor] = {}
    d = model.embed_dim
    if spec.family == "eva":
        for k, v in sd.items():
            if k.endswith("attn.qkv.bias"):  # q and v biases; the K bias is zero (masked or checked)
                out[k.replace("qkv.bias", "q_bias")], out[k.replace("qkv.bias", "v_bias")] = v[:d], v[2 * d:]
                continue
            name = _eva_key(k)
            if name is not None:
                out[name] = v
    else:
        regs = model.n_storage_tokens > 0
        for k, v in sd.items():
            if k == "cls_token" and regs:  # timm no_embed_class: the cls position is folded into the token
                out[k] = v + sd["pos_embed"][:, :1]
            elif k == "pos_embed" and regs:
                out[k] = v[:, 1:]
            else:
                name = _vit_key(k)
                if name is not None:
                    out[name] = v
    # timm always has attention-proj and FFN biases and LayerScale: zeros and ones stand for what we lack
    # (timm.create_model drops init_values=None, so LayerScale cannot be switched off there)
    with torch.device("meta"):
        ref = spec.create_model()
    expected = ref.state_dict()
    dtype = sd["cls_token"].dtype
    for k, v in expected.items():
        if k in out:
            continue
        if k.endswith(".bias") and (".attn.proj." in k or ".mlp." in k):
            out[k] = torch.zeros(v.shape, dtype=dtype)
        elif k.endswith((".gamma_1", ".gamma_2", ".ls1.gamma", ".ls2.gamma")) and not model.cfg.layerscale:
            out[k] = torch.ones(v.shape, dtype=dtype)
    missing, unexpected = sorted(set(expected) - set(out)), sorted(set(out) - set(expected))
    shapes = [k for k in set(expected) & set(out) if tuple(out[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:  # a mapping bug, not a user error
        raise RuntimeError(f"timm key mapping mismatch for {spec.name}: missing {missing}, "
                           f"unexpected {unexpected}, shapes {shapes}")
    _check_hyperparameters(model, ref)
    return cpu_copy(out)


def _check_hyperparameters(model: nn.Module, ref: nn.Module) -> None:
    """What shapes cannot show: norm eps and the RoPE base of the timm model must equal ours."""
    eps = _EPS[model.cfg.norm_layer]
    got = getattr(ref.norm, "eps", None)
    if got is None or abs(got - eps) > 1e-12:
        raise RuntimeError(f"timm model norm eps {got} != {eps}")
    if not model.dinov2 and abs(ref.rope.temperature - float(model.cfg.pos_embed_rope_base)) > 1e-9:
        raise RuntimeError(f"timm RoPE temperature {ref.rope.temperature} != {model.cfg.pos_embed_rope_base}")


def export_timm(model: nn.Module, out: str | os.PathLike, overwrite: bool = False) -> tuple[Path, TimmSpec]:
    """Write the timm-native file to `out`; returns (path, the timm model spec to load it with)."""
    path = Path(out)
    check_output_file(path, overwrite)
    spec = timm_spec(model)
    sd = timm_state_dict(model, spec)
    dropped_keys_note(model, "timm", antialias=True)  # timm's resample_abs_pos_embed antialiases
    save_tensors(sd, path)
    return path, spec
