"""Pictures of patch features: PCA maps (`pca_rgb`) and last-block CLS attention (`cls_attention`); `dinobridge viz`."""

from dinobridge.viz.attention import cls_attention, last_block_input
from dinobridge.viz.cli import main
from dinobridge.viz.colormap import colormap, grid, heatmap
from dinobridge.viz.pca import fit_pca, foreground_masks, pca_project, pca_rgb, pca_rgb_list

__all__ = [
    "cls_attention", "colormap", "fit_pca", "foreground_masks", "grid", "heatmap", "last_block_input", "main",
    "pca_project", "pca_rgb", "pca_rgb_list",
]
