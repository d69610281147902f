import pytest
import torch

from dinobridge.models.heads import DINOHead


def test_official_key_names_nlayers3():
    head = DINOHead(32, n_prototypes=64, hidden_dim=48, bottleneck_dim=16)
    assert list(head.state_dict()) == [
        "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias", "last_layer.weight"
    ]
    assert head.last_layer.weight.shape == (64, 16)
    assert not any("weight_g" in k or "parametrizations" in k for k in head.state_dict())


def test_key_names_other_depths():
    assert list(DINOHead(8, 10, 12, 4, nlayers=1).state_dict()) == ["mlp.weight", "mlp.bias", "last_layer.weight"]
    keys = list(DINOHead(8, 10, 12, 4, nlayers=4, mlp_bias=False).state_dict())
    assert keys == ["mlp.0.weight", "mlp.2.weight", "mlp.4.weight", "mlp.6.weight", "last_layer.weight"]
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(8, nlayers=0)


def test_output_shapes_and_partial_forward():
    torch.manual_seed(0)
    head = DINOHead(32, n_prototypes=64, hidden_dim=48, bottleneck_dim=16)
    head.init_weights()
    x = torch.randn(2, 5, 32)
    assert head(x).shape == (2, 5, 64)
    z = head(x, no_last_layer=True)
    assert z.shape == (2, 5, 16)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(2, 5))
    torch.testing.assert_close(head(z, only_last_layer=True), head(x))
    with pytest.raises(ValueError):
        head(x, no_last_layer=True, only_last_layer=True)


def test_forward_matches_float64_formula():
    torch.manual_seed(1)
    head = DINOHead(12, n_prototypes=20, hidden_dim=24, bottleneck_dim=8)
    head.init_weights()
    with torch.no_grad():  # non-zero biases so they are exercised
        for i in (0, 2, 4):
            head.mlp[i].bias.normal_()
    x = torch.randn(6, 12)
    p = {k: v.double() for k, v in head.state_dict().items()}
    gelu = torch.nn.functional.gelu
    h = gelu(x.double() @ p["mlp.0.weight"].T + p["mlp.0.bias"])
    h = gelu(h @ p["mlp.2.weight"].T + p["mlp.2.bias"])
    h = h @ p["mlp.4.weight"].T + p["mlp.4.bias"]
    h = h / h.norm(dim=-1, keepdim=True)
    ref = h @ p["last_layer.weight"].T
    torch.testing.assert_close(head(x).double(), ref, atol=1e-5, rtol=1e-4)


def test_builds_on_meta_then_initialises():
    with torch.device("meta"):
        head = DINOHead(64, n_prototypes=128, hidden_dim=256, bottleneck_dim=32)
    assert all(p.is_meta for p in head.parameters())
    head.to_empty(device="cpu")
    torch.manual_seed(0)
    head.reset_parameters()
    for i in (0, 2, 4):
        assert torch.count_nonzero(head.mlp[i].bias) == 0
    w = head.mlp[2].weight
    assert torch.isfinite(w).all()
    assert abs(w.std().item() - 0.02) < 0.002
    assert w.abs().max().item() < 0.15


def test_norm_last_layer_gives_cosine_logits_with_the_same_keys():
    from dinobridge.models.heads import DINOHead

    torch.manual_seed(0)
    plain = DINOHead(16, n_prototypes=32, hidden_dim=24, bottleneck_dim=8)
    normed = DINOHead(16, n_prototypes=32, hidden_dim=24, bottleneck_dim=8, norm_last_layer=True)
    normed.load_state_dict(plain.state_dict())
    assert list(normed.state_dict()) == list(plain.state_dict())
    x = torch.randn(5, 16)
    bottleneck = plain(x, no_last_layer=True)
    w = plain.last_layer.weight
    expected = bottleneck.double() @ (w.double() / w.double().norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(normed(x).double(), expected)
    assert normed(x).abs().max() <= 1.0 + 1e-6
    assert not torch.allclose(plain(x), normed(x))
