"""torch.hub entrypoints: `torch.hub.load(repo_dir, "dinov2_vitl14", source="local", weights="/path/file.pth")`."""

dependencies = ["torch"]

from dinobridge.hub import (  # noqa: E402,F401
    dinov2_vitb14,
    dinov2_vitb14_reg,
    dinov2_vitg14,
    dinov2_vitg14_reg,
    dinov2_vitl14,
    dinov2_vitl14_reg,
    dinov2_vits14,
    dinov2_vits14_reg,
    dinov3_vit7b16,
    dinov3_vitb16,
    dinov3_vith16plus,
    dinov3_vitl16,
    dinov3_vitl16plus,
    dinov3_vits16,
    dinov3_vits16plus,
)
