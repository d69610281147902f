"""Export the teacher backbone: official hub layout, Hugging Face `transformers` directory, timm checkpoint.

    from dinobridge.export import export_official, export_hf, export_timm, load_teacher
    model, _ = load_teacher(run="runs/vitl")                  # config.yaml + teacher weights of a run
    export_hf(model, "hf_model/")                             # AutoModel.from_pretrained("hf_model/")
    path, spec = export_timm(model, "teacher_timm.pth")       # spec.code(path): the timm.create_model call

Command line: `dinobridge export --run DIR --format official|hf|timm --out PATH` (see dinobridge/export/cli.py).
"""

from dinobridge.export.cli import main
from dinobridge.export.common import ExportError
from dinobridge.export.hf import export_hf, hf_config, hf_state_dict
from dinobridge.export.official import export_official, official_state_dict
from dinobridge.export.source import find_run_weights, load_teacher
from dinobridge.export.timm_format import TimmSpec, export_timm, timm_spec, timm_state_dict

__all__ = [
    "ExportError", "TimmSpec", "export_hf", "export_official", "export_timm", "find_run_weights", "hf_config",
    "hf_state_dict", "load_teacher", "main", "official_state_dict", "timm_spec", "timm_state_dict",
]
