"""`dinobridge export`: our backbone -> official / Hugging Face / timm files -> loaded by load_pretrained,
transformers.AutoModel and timm.create_model -> the same features (CLS, storage and patch tokens, fp32, <= 1e-5).

Also: timm model names chosen for every hub architecture, refusals of options a format cannot hold, and the CLI end to
end on a run directory made by hand (config.yaml from build_config + teacher weights).
"""

import dataclasses
import sys

import pytest
import torch

from dinobridge.export import (
    ExportError,
    export_hf,
    export_official,
    export_timm,
    find_run_weights,
    main,
    timm_spec,
    timm_state_dict,
)
from dinobridge.models import ViTConfig, VisionTransformer, load_pretrained
from vit_utils import randomise_vit

ATOL = 1e-5


def _randomise(model: VisionTransformer, seed: int = 0) -> VisionTransformer:
    return randomise_vit(model, seed).eval()


def _dinov3(**kw) -> VisionTransformer:
    base = dict(patch_size=16, embed_dim=64, depth=2, num_heads=4, ffn_layer="mlp", n_storage_tokens=4,
                mask_k_bias=True, layerscale=1e-5, norm_layer="layernormbf16", pos_embed_rope_rescale_coords=2.0)
    return _randomise(VisionTransformer(ViTConfig(**{**base, **kw})))


def _dinov2(**kw) -> VisionTransformer:
    # interpolate_offset 0: HF and timm resize the table without the official DINOv2 offset (only at other sizes)
    base = dict(patch_size=14, img_size=56, embed_dim=64, depth=2, num_heads=4, ffn_layer="mlp", n_storage_tokens=0,
                layerscale=1e-5, norm_layer="layernorm", pos_embed_type="learned", interpolate_offset=0.0)
    return _randomise(VisionTransformer(ViTConfig(**{**base, **kw})))


def _tokens(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """[cls, storage, patches] after the final norm: [B, 1 + R + HW, D]."""
    with torch.no_grad():
        out = model.forward_features(x)
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_storage_tokens"], out["x_norm_patchtokens"]], dim=1)


def _inputs(model: VisionTransformer) -> torch.Tensor:
    torch.manual_seed(1)
    c = model.cfg.in_chans
    if model.dinov2:  # the native grid (other sizes interpolate the table, differently per library)
        return torch.randn(2, c, model.cfg.img_size, model.cfg.img_size)
    return torch.randn(2, c, 48, 80)  # non-square, so a swapped RoPE axis would show


# ---------------------------------------------------------------------- official
@pytest.mark.parametrize("make", [lambda: _dinov3(untie_global_and_local_cls_norm=True),
                                  lambda: _dinov2(n_storage_tokens=4, ffn_layer="swiglufused")])
def test_official_round_trip(tmp_path, make):
    model = make()
    path = export_official(model, tmp_path / "backbone.pth")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert set(sd) == set(model.state_dict())  # flat hub layout, nothing dropped (local_cls_norm kept)
    fresh = VisionTransformer(model.cfg).eval()
    load_pretrained(fresh, path, strict=True)
    x = _inputs(model)
    torch.testing.assert_close(_tokens(fresh, x), _tokens(model, x), atol=ATOL, rtol=ATOL)


# ---------------------------------------------------------------------- Hugging Face
HF_CASES = {
    "v3-mlp-storage-maskk-localnorm": lambda: _dinov3(untie_global_and_local_cls_norm=True),
    "v3-swiglu-nostorage-kbias": lambda: _dinov3(ffn_layer="swiglu", n_storage_tokens=0, mask_k_bias=False),
    "v2-mlp": lambda: _dinov2(),
    "v2-reg4-swiglufused": lambda: _dinov2(n_storage_tokens=4, ffn_layer="swiglufused", interpolate_antialias=True),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_round_trip(tmp_path, case):
    transformers = pytest.importorskip("transformers")
    model = HF_CASES[case]()
    out = export_hf(model, tmp_path / "hf")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    hf, info = transformers.AutoModel.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    expected = "Dinov2WithRegistersModel" if model.dinov2 and model.n_storage_tokens else (
        "Dinov2Model" if model.dinov2 else "DINOv3ViTModel")
    assert type(hf).__name__ == expected
    hf.eval()
    x = _inputs(model)
    with torch.no_grad():
        theirs = hf(pixel_values=x)
    ours = _tokens(model, x)
    torch.testing.assert_close(theirs.last_hidden_state, ours, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(theirs.pooler_output, ours[:, 0], atol=ATOL, rtol=ATOL)
    # and back: load_pretrained reads the HF file into our model (without local_cls_norm: HF drops it)
    fresh = VisionTransformer(dataclasses.replace(model.cfg, untie_global_and_local_cls_norm=False)).eval()
    load_pretrained(fresh, out / "model.safetensors")
    torch.testing.assert_close(_tokens(fresh, x), ours, atol=ATOL, rtol=ATOL)


# ---------------------------------------------------------------------- timm
TIMM_CASES = {
    # (model factory, expected timm model name)
    "v3-swiglu-storage-maskk": (lambda: _dinov3(ffn_layer="swiglu", untie_global_and_local_cls_norm=True),
                                "vit_small_plus_patch16_dinov3_qkvb"),
    "v3-swiglu64-ratio4": (lambda: _dinov3(ffn_layer="swiglu64"), "vit_small_plus_patch16_dinov3_qkvb"),
    "v3-nobias-nols-rmsnorm-base50": (
        lambda: _dinov3(n_storage_tokens=0, qkv_bias=False, proj_bias=False, ffn_bias=False, layerscale=None,
                        norm_layer="rmsnorm", pos_embed_rope_base=50.0, mask_k_bias=False),
        "vit_small_patch16_dinov3"),
    "v3-layernorm1e-6-zero-kbias": (lambda: _zero_k_bias(_dinov3(mask_k_bias=False, norm_layer="layernorm")),
                                    "vit_tiny_patch16_dinov3_qkvb"),
    "v3-in_chans1": (lambda: _dinov3(in_chans=1), "vit_tiny_patch16_dinov3_qkvb"),
    "v2-mlp": (lambda: _dinov2(), "vit_small_patch14_dinov2"),
    "v2-reg4-swiglufused": (lambda: _dinov2(n_storage_tokens=4, ffn_layer="swiglufused"),
                            "vit_giant_patch14_reg4_dinov2"),
}


def _zero_k_bias(model: VisionTransformer) -> VisionTransformer:
    d = model.embed_dim
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.bias[d:2 * d] = 0
    return model


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_round_trip(tmp_path, case):
    pytest.importorskip("timm")
    make, name = TIMM_CASES[case]
    model = make()
    path, spec = export_timm(model, tmp_path / "timm.pth")
    assert spec.name == name
    assert spec.code(path).startswith(f"timm.create_model('{name}', pretrained=True, pretrained_cfg_overlay=")
    tm = spec.create_model(path).eval()  # timm.create_model(name, pretrained=True, pretrained_cfg_overlay=...)
    x = _inputs(model)
    with torch.no_grad():
        theirs = tm.forward_features(x)  # [B, 1 + R + HW, D], normed
    torch.testing.assert_close(theirs, _tokens(model, x), atol=ATOL, rtol=ATOL)


def test_timm_safetensors_and_masked_k_bias_ignored(tmp_path):
    """A masked K bias may hold any value in the parameter; timm (K bias fixed at 0) still matches."""
    pytest.importorskip("timm")
    model = _dinov3()
    assert model.blocks[0].attn.qkv.bias[64:128].abs().max() > 0  # nonzero but masked
    path, spec = export_timm(model, tmp_path / "timm.safetensors")
    tm = spec.create_model(path).eval()
    x = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(tm.forward_features(x), _tokens(model, x), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("hub_name,timm_name,overrides", [
    ("dinov3_vits16", "vit_small_patch16_dinov3_qkvb", {}),
    ("dinov3_vits16plus", "vit_small_plus_patch16_dinov3_qkvb", {}),
    ("dinov3_vitb16", "vit_base_patch16_dinov3_qkvb", {}),
    ("dinov3_vitl16", "vit_large_patch16_dinov3_qkvb", {}),
    ("dinov3_vitl16plus", "vit_large_patch16_dinov3_qkvb", {"swiglu_mlp": True, "swiglu_align_to": 8}),
    ("dinov3_vith16plus", "vit_huge_plus_patch16_dinov3_qkvb", {}),
    ("dinov2_vits14", "vit_small_patch14_dinov2", {}),
    ("dinov2_vitl14_reg", "vit_large_patch14_reg4_dinov2", {}),
    ("dinov2_vitg14", "vit_giant_patch14_dinov2", {}),
])
def test_timm_names_of_hub_models(hub_name, timm_name, overrides):
    """Released architectures map to timm's named models with no overrides (meta device: no memory, no init)."""
    pytest.importorskip("timm")
    from dinobridge.hub import hub_config

    with torch.device("meta"):
        model = VisionTransformer(hub_config(hub_name))
    spec = timm_spec(model)
    assert (spec.name, spec.kwargs) == (timm_name, overrides)
    timm_state_dict(model, spec)  # keys, shapes, norm eps and RoPE base checked against the timm model


def test_timm_name_of_user_vitl_swiglu64():
    """The user's config (vit_large, swiglu64, ratio 4 -> hidden 2752) needs SwiGLU overrides on ViT-L."""
    pytest.importorskip("timm")
    from dinobridge.hub import hub_config

    with torch.device("meta"):
        model = VisionTransformer(hub_config("dinov3_vitl16", ffn_layer="swiglu64", ffn_ratio=4.0))
    spec = timm_spec(model)
    assert spec.name == "vit_large_patch16_dinov3_qkvb"
    assert spec.kwargs == {"swiglu_mlp": True, "swiglu_align_to": 8, "mlp_ratio": 2752 / 1024}
    assert model.blocks[0].mlp.w1.out_features == 2752


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize("make,fmt,needle", [
    (lambda: _dinov3(untie_cls_and_patch_norms=True), "timm", "untie_cls_and_patch_norms"),
    (lambda: _dinov3(untie_cls_and_patch_norms=True), "hf", "untie_cls_and_patch_norms"),
    (lambda: _dinov3(pos_embed_rope_base=None, pos_embed_rope_min_period=0.5, pos_embed_rope_max_period=50.0),
     "timm", "min/max periods"),
    (lambda: _dinov3(pos_embed_rope_normalize_coords="max"), "timm", "pos_embed_rope_normalize_coords=max"),
    (lambda: _dinov3(mask_k_bias=False), "timm", "nonzero K bias"),
    (lambda: _dinov3(ffn_layer="swiglufused"), "timm", "swiglufused"),
    (lambda: _dinov2(ffn_layer="swiglu"), "timm", "ffn_layer=swiglu in a DINOv2 model"),
    (lambda: _dinov3(norm_layer="rmsnorm"), "hf", "rmsnorm"),
])
def test_unrepresentable_options_are_refused(tmp_path, make, fmt, needle):
    pytest.importorskip("timm" if fmt == "timm" else "transformers")
    model = make()
    export = export_timm if fmt == "timm" else export_hf
    with pytest.raises(ExportError, match="cannot express in") as e:
        export(model, tmp_path / ("m.pth" if fmt == "timm" else "hf"))
    assert needle in str(e.value)
    assert not any(tmp_path.iterdir())  # nothing written


# ---------------------------------------------------------------------- CLI
def _make_run(root, with_final: bool = True, **student):
    """A run directory by hand: config.yaml from build_config + teacher weights (final and/or eval exports).

    RoPE in fp32 (the config default is bf16), as HF and timm compute it, so features can agree to 1e-5."""
    from dinobridge.config import build_config, save_config
    from dinobridge.train.meta_arch import build_backbone

    overrides = ["student.arch=vit_test", "student.n_storage_tokens=2", "student.mask_k_bias=true",
                 "student.untie_global_and_local_cls_norm=true",
                 "student.pos_embed_rope_dtype=fp32"] + [f"student.{k}={v}" for k, v in student.items()]
    cfg = build_config(None, overrides, output_dir=str(root))
    save_config(cfg, root / "config.yaml")
    model = _randomise(build_backbone(cfg.student, teacher=True), seed=3)
    if with_final:
        torch.save(model.state_dict(), root / "teacher_backbone.pth")
    return model


def test_cli_end_to_end_all_formats(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("timm")
    run = tmp_path / "run"
    model = _make_run(run)
    x = torch.randn(2, 3, 32, 48)
    ours = _tokens(model, x)

    assert main(["--run", str(run), "--format", "official", "--out", str(tmp_path / "o.pth")]) == 0
    fresh = VisionTransformer(model.cfg).eval()
    load_pretrained(fresh, tmp_path / "o.pth", strict=True)
    torch.testing.assert_close(_tokens(fresh, x), ours, atol=ATOL, rtol=ATOL)

    assert main(["--run", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).last_hidden_state, ours, atol=ATOL, rtol=ATOL)

    capsys.readouterr()
    assert main(["--run", str(run), "--format", "timm", "--out", str(tmp_path / "t.pth")]) == 0
    printed = capsys.readouterr().out
    spec = timm_spec(model)
    assert spec.code(tmp_path / "t.pth") in printed and "timm model: vit_tiny_patch16_dinov3_qkvb" in printed
    with torch.no_grad():
        torch.testing.assert_close(spec.create_model(tmp_path / "t.pth").eval().forward_features(x), ours,
                                   atol=ATOL, rtol=ATOL)

    # through the top-level command, with --config + --weights instead of --run
    from dinobridge.cli import main as top_main

    assert top_main(["export", "--weights", str(run / "teacher_backbone.pth"), "--config", str(run / "config.yaml"),
                     "--format", "official", "--out", str(tmp_path / "o2.pth")]) == 0
    a = torch.load(tmp_path / "o.pth", weights_only=True)
    b = torch.load(tmp_path / "o2.pth", weights_only=True)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_run_without_final_uses_newest_eval_export(tmp_path):
    run = tmp_path / "run"
    model = _make_run(run, with_final=False)
    for it, scale in ((99, 0.0), (1000, 1.0), (250, 0.0)):  # only the newest (1000) holds the real weights
        d = run / "eval" / f"training_{it}"
        d.mkdir(parents=True)
        teacher = {f"backbone.{k}": v * scale if v.is_floating_point() and "periods" not in k and "bias_mask" not in k
                   else v for k, v in model.state_dict().items()}
        teacher["dino_head.last_layer.weight"] = torch.zeros(4, 4)
        torch.save({"teacher": teacher}, d / "teacher_checkpoint.pth")
    assert find_run_weights(run) == run / "eval" / "training_1000" / "teacher_checkpoint.pth"
    assert main(["--run", str(run), "--format", "official", "--out", str(tmp_path / "o.pth")]) == 0
    sd = torch.load(tmp_path / "o.pth", weights_only=True)
    assert set(sd) == set(model.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def _one_error_line(capsys, needle: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dinobridge export: error:") and needle in err[0], err


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _make_run(run, untie_cls_and_patch_norms="true")
    capsys.readouterr()
    out = str(tmp_path / "x.pth")
    cases = [
        (["--run", str(tmp_path / "missing"), "--format", "official", "--out", out], "run directory not found"),
        (["--run", str(run), "--format", "onnx", "--out", out], "--format: expected one of official, hf, timm"),
        (["--weights", str(tmp_path / "nope.pth"), "--model", "dinov3_vits16", "--format", "official", "--out", out],
         "file not found"),
        (["--model", "dinov3_vits16", "--format", "official", "--out", out], "--weights is required"),
        (["--format", "official", "--out", out], "give exactly one of --run"),
        (["--run", str(run), "--out", out], "--format"),
        (["--run", str(run), "--format", "timm", "--out", out], "untie_cls_and_patch_norms"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        _one_error_line(capsys, needle)
    assert not (tmp_path / "x.pth").exists()
    # an existing output is kept unless --overwrite
    (tmp_path / "keep.pth").write_bytes(b"x")
    assert main(["--run", str(run), "--format", "official", "--out", str(tmp_path / "keep.pth")]) == 2
    _one_error_line(capsys, "pass --overwrite")
    # transformers missing
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    assert main(["--run", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    _one_error_line(capsys, "needs the transformers package")
