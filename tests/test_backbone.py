"""The ViT backbone: official keys and shapes, checkpoint round trips, crops lists, masks, RoPE, compile."""

import math

import pytest
import torch

from dinobridge import hub
from dinobridge.models import ViTConfig, VisionTransformer, build_vit, load_pretrained
from dinobridge.models.checkpoint import CheckpointMismatchError
from dinobridge.models.rope import RopePositionEmbedding


def tiny(**kw) -> VisionTransformer:
    base = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, n_storage_tokens=4, layerscale=1e-5,
                mask_k_bias=True, norm_layer="layernormbf16")
    base.update(kw)
    return VisionTransformer(ViTConfig(**base))


def official_vitl16_keys() -> dict[str, tuple]:
    """The 368 keys of the official dinov3_vitl16 hub checkpoint (reference §2.7), written out independently."""
    D = 1024
    keys = {
        "cls_token": (1, 1, D), "storage_tokens": (1, 4, D), "mask_token": (1, D),
        "patch_embed.proj.weight": (D, 3, 16, 16), "patch_embed.proj.bias": (D,), "rope_embed.periods": (16,),
        "norm.weight": (D,), "norm.bias": (D,),
    }
    for i in range(24):
        b = f"blocks.{i}."
        keys.update({
            b + "norm1.weight": (D,), b + "norm1.bias": (D,),
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,), b + "attn.qkv.bias_mask": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,), b + "ls1.gamma": (D,),
            b + "norm2.weight": (D,), b + "norm2.bias": (D,),
            b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
            b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,), b + "ls2.gamma": (D,),
        })
    return keys


def test_vitl16_has_exactly_the_official_keys_and_shapes():
    with torch.device("meta"):
        model = hub.dinov3_vitl16()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = official_vitl16_keys()
    assert len(want) == 368
    assert got == want
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params / 1e6 - 303.15) < 0.01


@pytest.mark.parametrize("name,millions", [("dinov3_vits16", 21.60), ("dinov3_vits16plus", 28.70),
                                           ("dinov3_vitb16", 85.67), ("dinov3_vitl16plus", 403.92),
                                           ("dinov3_vith16plus", 840.63), ("dinov3_vit7b16", 6716.04)])
def test_hub_param_counts_match_official(name, millions):
    with torch.device("meta"):
        model = getattr(hub, name)()
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - millions) < 0.01


def test_vit7b_and_dinov2_key_variants():
    with torch.device("meta"):
        m7 = hub.dinov3_vit7b16()
        v2 = hub.dinov2_vitl14()
        v2r = hub.dinov2_vitg14_reg()
    k7 = set(m7.state_dict())
    assert "local_cls_norm.weight" in k7 and "blocks.0.attn.qkv.bias" not in k7 and "blocks.0.attn.qkv.bias_mask" not in k7
    assert "blocks.0.mlp.w1.weight" in k7 and m7.state_dict()["blocks.0.mlp.w1.weight"].shape == (8192, 4096)
    s2 = v2.state_dict()
    assert s2["pos_embed"].shape == (1, 1 + 37 * 37, 1024) and "rope_embed.periods" not in s2
    assert s2["mask_token"].shape == (1, 1024) and "register_tokens" not in s2
    sg = v2r.state_dict()
    assert sg["register_tokens"].shape == (1, 4, 1536)
    assert sg["blocks.0.mlp.w12.weight"].shape == (8192, 1536) and sg["blocks.0.mlp.w3.weight"].shape == (1536, 4096)


def test_meta_construction_then_init_is_finite():
    with torch.device("meta"):
        model = tiny()
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    torch.testing.assert_close(model.rope_embed.periods, 100.0 ** (torch.arange(4) / 4.0 * 2 / 2))
    mask = model.blocks[0].attn.qkv.bias_mask
    assert mask.tolist() == [1.0] * 32 + [0.0] * 32 + [1.0] * 32


def test_save_then_strict_load_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = tiny(ffn_layer="swiglu").eval()
    path = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), path)
    fresh = tiny(ffn_layer="swiglu").eval()
    load_pretrained(fresh, path)
    x = torch.randn(2, 3, 32, 24)
    with torch.no_grad():
        a, b = model.forward_features(x), fresh.forward_features(x)
    for k in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
        assert torch.equal(a[k], b[k])


def test_teacher_export_and_safetensors_layouts_load(tmp_path):
    from safetensors.torch import save_file

    model = tiny().eval()
    sd = model.state_dict()
    export = {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, "dino_head.mlp.0.weight": torch.zeros(4, 4)}}
    torch.save(export, tmp_path / "teacher_checkpoint.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "b.safetensors"))
    x = torch.randn(1, 3, 16, 16)
    for name in ("teacher_checkpoint.pth", "b.safetensors"):
        fresh = tiny().eval()
        load_pretrained(fresh, tmp_path / name)
        with torch.no_grad():
            assert torch.equal(fresh(x), model(x))


def test_mismatch_error_lists_missing_unexpected_and_shapes(tmp_path):
    sd = tiny().state_dict()
    sd["blocks.0.attn.qkv_renamed.weight"] = sd.pop("blocks.0.attn.qkv.weight")
    sd["norm.weight"] = torch.ones(7)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as e:
        load_pretrained(tiny(), tmp_path / "bad.pth")
    msg = str(e.value)
    assert "missing keys (1): blocks.0.attn.qkv.weight" in msg
    assert "unexpected keys (1): blocks.0.attn.qkv_renamed.weight" in msg
    assert "norm.weight: checkpoint (7,) vs model (32,)" in msg
    # non-strict loads what matches and reports the rest
    fresh = tiny()
    result = load_pretrained(fresh, tmp_path / "bad.pth", strict=False)
    assert "blocks.0.attn.qkv.weight" in result["missing_keys"]


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        hub.dinov3_vits16(weights=tmp_path / "nope.pth")


def test_torch_hub_local_load(tmp_path):
    import os

    with torch.device("meta"):
        ref = hub.dinov2_vits14()
    ref = ref.to_empty(device="cpu")
    ref.init_weights()
    torch.save(ref.state_dict(), tmp_path / "dinov2_vits14_pretrain.pth")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model = torch.hub.load(repo, "dinov2_vits14", source="local", weights=str(tmp_path / "dinov2_vits14_pretrain.pth"))
    x = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref.eval()(x))


@pytest.mark.parametrize("drop_path", [0.0, 0.5])
def test_list_of_crops_equals_separate_calls(drop_path):
    torch.manual_seed(0)
    model = tiny(ffn_layer="swiglu", untie_cls_and_patch_norms=True, drop_path_rate=drop_path).eval()
    xg, xl = torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 24)
    masks = torch.rand(4, 16) < 0.4
    with torch.no_grad():
        together = model.forward_features([xg, xl], [masks, None])
        alone = [model.forward_features(xg, masks), model.forward_features(xl)]
    for a, b in zip(together, alone):
        for k in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert together[0]["masks"] is masks


def test_masks_substitute_the_mask_token():
    torch.manual_seed(0)
    model = tiny().eval()
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, 5] = masks[1, 0] = True
    y = x.clone()
    y[0, :, 8:16, 8:16] += 5.0  # patch 5 of image 0 (row 1, col 1)
    y[1, :, 0:8, 0:8] -= 3.0  # patch 0 of image 1
    with torch.no_grad():
        a, b = model.forward_features(x, masks), model.forward_features(y, masks)
        c = model.forward_features(y)
        tokens, _, _ = model.prepare_tokens(x, masks)
    torch.testing.assert_close(a["x_prenorm"], b["x_prenorm"])  # masked content is invisible
    assert not torch.allclose(a["x_prenorm"], c["x_prenorm"])
    torch.testing.assert_close(tokens[0, 1 + 4 + 5], model.mask_token[0])


def test_untied_local_cls_norm_applies_to_second_list_element_in_training_only():
    model = tiny(untie_global_and_local_cls_norm=True)
    with torch.no_grad():
        model.local_cls_norm.weight.fill_(3.0)
    xg, xl = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    model.train()
    out = model.forward_features([xg, xl])
    plain = model.norm(out[1]["x_prenorm"][:, 0])
    local = model.local_cls_norm(out[1]["x_prenorm"][:, 0])
    torch.testing.assert_close(out[1]["x_norm_clstoken"], local)
    assert not torch.allclose(out[1]["x_norm_clstoken"], plain)
    model.eval()
    out = model.forward_features([xg, xl])
    torch.testing.assert_close(out[1]["x_norm_clstoken"], model.norm(out[1]["x_prenorm"][:, 0]))


def test_get_intermediate_layers_semantics():
    torch.manual_seed(0)
    model = tiny(depth=3).eval()
    x = torch.randn(2, 3, 32, 24)
    with torch.no_grad():
        full = model.forward_features(x)
        last = model.get_intermediate_layers(x, n=1)
        maps = model.get_intermediate_layers(x, n=[0, 2], reshape=True, return_class_token=True, return_extra_tokens=True)
        raw = model.get_intermediate_layers(x, n=2, norm=False)
    assert len(last) == 1
    torch.testing.assert_close(last[0], full["x_norm_patchtokens"])
    assert len(maps) == 2 and len(maps[1]) == 3
    patches, cls, storage = maps[1]
    assert patches.shape == (2, 32, 4, 3) and cls.shape == (2, 32) and storage.shape == (2, 4, 32)
    torch.testing.assert_close(cls, full["x_norm_clstoken"])
    torch.testing.assert_close(patches.flatten(2).transpose(1, 2), full["x_norm_patchtokens"])
    torch.testing.assert_close(raw[1], full["x_prenorm"][:, 5:])
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(x, n=[5])


def test_rope_tables_cached_and_augmented_only_in_training():
    rope = RopePositionEmbedding(64, 4, base=100.0, rescale_coords=2.0)
    rope.eval()
    s1, c1 = rope(3, 5)
    s2, _ = rope(3, 5)
    assert s1 is s2 and s1.shape == (15, 16)
    # formula check (float64 oracle): angle of token (i, j), frequency f of the h half
    periods = 100.0 ** (2 * torch.arange(4, dtype=torch.float64) / 8)
    ch = (torch.arange(3, dtype=torch.float64) + 0.5) / 3 * 2 - 1
    cw = (torch.arange(5, dtype=torch.float64) + 0.5) / 5 * 2 - 1
    i, j = 2, 4
    ang = torch.cat([2 * math.pi * ch[i] / periods, 2 * math.pi * cw[j] / periods]).repeat(2)
    torch.testing.assert_close(s1[i * 5 + j].double(), ang.sin(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(c1[i * 5 + j].double(), ang.cos(), atol=1e-6, rtol=1e-5)
    sp, cp = rope(3, 5, n_prefix=2)  # identity rows for prefix tokens
    assert torch.equal(sp[:2], torch.zeros(2, 16)) and torch.equal(cp[:2], torch.ones(2, 16))
    assert torch.equal(sp[2:], s1)
    rope.train()
    torch.manual_seed(0)
    s3, _ = rope(3, 5)
    assert not torch.allclose(s3, s1)


def test_rope_min_max_period_and_errors():
    rope = RopePositionEmbedding(64, 4, base=None, min_period=1.0, max_period=50.0)
    torch.testing.assert_close(rope.periods, torch.tensor([1.0, 50 ** (1 / 3), 50 ** (2 / 3), 50.0]))
    with pytest.raises(ValueError, match="either"):
        RopePositionEmbedding(64, 4, base=100.0, min_period=1.0, max_period=10.0)
    with pytest.raises(ValueError, match="ffn_layer"):
        ViTConfig(ffn_layer="geglu")


def test_drop_path_and_patch_drop_in_training():
    torch.manual_seed(0)
    model = tiny(drop_path_rate=0.5, patch_drop=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    out = model.forward_features([x, x], [torch.zeros(4, 16, dtype=torch.bool), None])
    assert out[0]["x_norm_patchtokens"].shape == (4, 16, 32)  # masked input: no patch drop
    assert out[1]["x_norm_patchtokens"].shape == (4, 8, 32)
    assert out[1]["patch_keep_indices"].shape == (4, 8)
    out[0]["x_norm_clstoken"].sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_drop_path_residual_equals_index_add_values_and_gradients():
    # the stochastic-depth residual takes and writes rows without atomics; reference: x.index_add(idx, f(x[idx]) * s)
    from dinobridge.models.layers import _residual

    w = torch.randn(8, 8, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        x = torch.randn(6, 5, 8, dtype=dtype, requires_grad=True)
        branch = lambda y, idx: torch.tanh(y @ w.to(dtype))  # noqa: E731
        torch.manual_seed(1)
        out = _residual(x, branch, 0.4, training=True)
        torch.manual_seed(1)
        idx = torch.randperm(6)[:3]
        ref = torch.index_add(x, 0, idx, branch(x[idx], idx) * 2.0)
        g = torch.randn_like(out)
        assert torch.equal(out, ref)
        assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])
        assert not torch.equal(out, x)  # the branch did add something


def test_rmsnorm_and_swiglu_variants_run():
    for ffn in ("swiglu32", "swiglu64", "swiglu128"):
        m = tiny(ffn_layer=ffn, norm_layer="rmsnorm", qkv_bias=False, proj_bias=False, ffn_bias=False)
        assert m.blocks[0].mlp.w1.out_features % int(ffn[6:]) == 0
        assert m(torch.randn(1, 3, 16, 16)).shape == (1, 32)


def test_block_compiles_without_graph_breaks():
    model = tiny(drop_path_rate=0.2)
    block = model.blocks[0].train()
    rope = model.rope_embed.eval()(4, 4, n_prefix=5)  # whole-sequence tables; the list call below uses patch-only ones
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 21, 32, requires_grad=True)
    y = compiled(x, rope)
    y.sum().backward()
    assert y.shape == x.shape and x.grad is not None
    ys = compiled([x, torch.randn(2, 9, 32)], [rope, model.rope_embed(2, 2)])
    assert ys[1].shape == (2, 9, 32)


def test_build_vit_unknown_arch():
    with pytest.raises(ValueError, match="vit_small"):
        build_vit("vit_smol")
