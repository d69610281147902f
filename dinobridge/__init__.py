"""dinobridge: DINOv3-style self-supervised pretraining."""
__version__ = "0.1.0"
