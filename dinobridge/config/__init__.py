"""Typed configuration (OmegaConf structured dataclasses with the official DINOv3 key names) and the launch front-end.

    cfg = build_config("dinov3_vitlarge_pretrain.yaml", ["optim.epochs=10"], output_dir="/runs/x")
    cfg = build_config(config_name="train")              # a preset from dinobridge/configs/
    sys.exit(launch(sys.argv[1:], run_fn))               # CLI: --config-file/--config-name, overrides, -m sweeps

Schema: dinobridge/config/schema.py (official sections), addons.py (dtch, resize_shuffle_augmentor, data sources),
schedules.py. Presets: dinobridge/configs/*.yaml (mirrored in the repository's top-level configs/).
"""

from dinobridge.config.dataset_spec import DatasetSpec, parse_dataset_string
from dinobridge.config.launch import launch, plan_jobs
from dinobridge.config.load import (
    PACKAGE_CONFIG_DIR,
    build_config,
    config_to_container,
    config_to_object,
    list_presets,
    save_config,
)
from dinobridge.config.schema import Config, effective_koleo_cls_weight

__all__ = [
    "PACKAGE_CONFIG_DIR",
    "Config",
    "DatasetSpec",
    "build_config",
    "config_to_container",
    "config_to_object",
    "effective_koleo_cls_weight",
    "launch",
    "list_presets",
    "parse_dataset_string",
    "plan_jobs",
    "save_config",
]
