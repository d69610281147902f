"""Parity of our ViT with Hugging Face transformers' DINOv3ViTModel, Dinov2Model and Dinov2WithRegistersModel.

Our weights are mapped to HF names (dinobridge.models.convert), loaded strictly into the HF model, and both models
must give the same last_hidden_state and pooled output to 1e-5 in fp32. Mapping back must reproduce our state dict.
"""

import itertools

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dinobridge.models import ViTConfig, VisionTransformer  # noqa: E402
from dinobridge.models.convert import from_hf_state_dict, hf_config_dict, to_hf_state_dict  # noqa: E402
from vit_utils import randomise_vit  # noqa: E402


def _randomise(model: VisionTransformer, seed: int = 0) -> None:
    randomise_vit(model, seed)


def _hf_model(model: VisionTransformer):
    kw = hf_config_dict(model)
    model_type = kw.pop("model_type")
    cls_cfg, cls_model = {
        "dinov3_vit": (transformers.DINOv3ViTConfig, transformers.DINOv3ViTModel),
        "dinov2": (transformers.Dinov2Config, transformers.Dinov2Model),
        "dinov2_with_registers": (transformers.Dinov2WithRegistersConfig, transformers.Dinov2WithRegistersModel),
    }[model_type]
    cfg = cls_cfg(**kw)
    cfg._attn_implementation = "eager"
    hf = cls_model(cfg).eval()
    hf_keys = set(hf.state_dict())
    layer_prefix = "model.layer" if any(k.startswith("model.layer.") for k in hf_keys) else (
        "encoder.layer" if any(k.startswith("encoder.layer.") for k in hf_keys) else "layer")
    sd = to_hf_state_dict(model.state_dict(), dinov2=model.dinov2, layer_prefix=layer_prefix)
    if "embeddings.register_tokens" in hf_keys and "embeddings.register_tokens" not in sd:
        sd["embeddings.register_tokens"] = torch.zeros(1, 0, model.embed_dim)
    result = hf.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return hf


def _ours_last_hidden(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    out = model.forward_features(x)
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_storage_tokens"], out["x_norm_patchtokens"]], dim=1)


def _compare(model: VisionTransformer, hf, sizes) -> None:
    torch.manual_seed(1)
    for h, w in sizes:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            ours = _ours_last_hidden(model, x)
            theirs = hf(pixel_values=x)
        torch.testing.assert_close(ours, theirs.last_hidden_state, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), theirs.pooler_output, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ffn,storage,mask_k_bias", list(itertools.product(["mlp", "swiglu"], [0, 4], [True, False])))
def test_dinov3_matches_hf(ffn, storage, mask_k_bias):
    cfg = ViTConfig(patch_size=16, embed_dim=64, depth=2, num_heads=4, ffn_layer=ffn, ffn_ratio=4.0,
                    n_storage_tokens=storage, mask_k_bias=mask_k_bias, layerscale=1e-5, norm_layer="layernormbf16",
                    pos_embed_rope_base=100.0, pos_embed_rope_rescale_coords=2.0)
    model = VisionTransformer(cfg).eval()
    _randomise(model)
    hf = _hf_model(model)
    _compare(model, hf, [(64, 64), (48, 80)])
    # and back: HF keys -> ours reproduces our state dict exactly (masked K bias comes back as zero where HF drops it)
    back = from_hf_state_dict(hf.state_dict(), model)
    for k, v in model.state_dict().items():
        if mask_k_bias and k.endswith("attn.qkv.bias"):
            d = v.shape[0] // 3
            torch.testing.assert_close(back[k][:d], v[:d])
            torch.testing.assert_close(back[k][2 * d:], v[2 * d:])
        else:
            torch.testing.assert_close(back[k], v, msg=k)


@pytest.mark.parametrize("registers,ffn", [(0, "mlp"), (4, "mlp"), (0, "swiglufused")])
def test_dinov2_matches_hf(registers, ffn):
    # HF Dinov2Model resizes the position table to the grid size with no offset; official DINOv2 (non-register)
    # models use offset 0.1 (our hub default). Register models use antialias and no offset, like HF.
    cfg = ViTConfig(patch_size=14, img_size=56, embed_dim=64, depth=2, num_heads=4, ffn_layer=ffn, ffn_ratio=4.0,
                    n_storage_tokens=registers, layerscale=1e-5, norm_layer="layernorm", pos_embed_type="learned",
                    interpolate_offset=0.0, interpolate_antialias=registers > 0)
    model = VisionTransformer(cfg).eval()
    _randomise(model, seed=registers)
    hf = _hf_model(model)
    _compare(model, hf, [(56, 56), (70, 42)])  # (70, 42) needs interpolation of the 4 x 4 table to 5 x 3


def test_hf_layout_file_loads_with_load_pretrained(tmp_path):
    from safetensors.torch import save_file

    from dinobridge.models import load_pretrained

    cfg = ViTConfig(patch_size=16, embed_dim=64, depth=2, num_heads=4, n_storage_tokens=4, mask_k_bias=True,
                    layerscale=1e-5, norm_layer="layernormbf16")
    model = VisionTransformer(cfg).eval()
    _randomise(model)
    hf = _hf_model(model)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    fresh = VisionTransformer(cfg).eval()
    load_pretrained(fresh, path)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
