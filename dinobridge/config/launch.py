"""Launch front-end shared by `dinobridge train`, `python -m dinobridge.train` and `torchrun -m dinobridge.train`.

    launch(argv, run_fn, config_name="train") -> exit code

Accepted command lines (flags and overrides may be mixed):
  official form   --config-file FILE --output-dir DIR [--no-resume] [--seed N] [key=value ...]
  presets         --config-name NAME | -cn NAME | experiment=NAME     (default: `config_name`, i.e. train.yaml)
  overrides       Hydra grammar: a.b=1  a.b=[1,2]  a.b=null  ~a.b  data.NAME.root=DIR
  sweeps          -m/--multirun with Hydra sweep syntax: a=1,2  a=range(0,3)  a=choice(x,y)  experiment=p1,p2
Every job gets a deterministic run directory, the same on every torchrun rank (no timestamps):
  single run  train.output_dir = --output-dir | the YAML/override value | ./outputs/<preset or file stem>
  multirun    <that directory>/<job index>_<swept key=value>_... ; jobs run one after the other, in Hydra's order
On rank 0 (RANK unset or 0) launch writes the resolved config to <train.output_dir>/config.yaml before calling
`run_fn(cfg)` (pass write_config=False to leave that to run_fn). `--no-resume` sets train.resume=false, `--seed N`
sets train.seed, `--checkpoint-dir DIR` sets checkpointing.dir. A UserError (bad config, data, paths) from the config
or from run_fn is printed as one line on stderr and launch returns 2. Under torchrun with --multirun every rank runs
the same job sequence, so run_fn must set up and tear down its process group per job.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from omegaconf import DictConfig, OmegaConf

from dinobridge.config.load import PRESET_KEY, build_config, list_presets, parse_overrides, save_config
from dinobridge.errors import ConfigError, UserError

CONFIG_FILENAME = "config.yaml"


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message} (see --help)")


def _parser(prog: str) -> _ArgumentParser:
    p = _ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("--config-file", "--config_file", dest="config_file")
    p.add_argument("--config-name", "-cn", dest="config_name")
    p.add_argument("--config-dir", "-cd", dest="config_dirs", action="append", default=[])
    p.add_argument("--output-dir", "--output_dir", dest="output_dir")
    p.add_argument("--no-resume", "--no_resume", dest="no_resume", action="store_true")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-dir", "--checkpoint_dir", dest="checkpoint_dir")
    p.add_argument("-m", "--multirun", action="store_true")
    p.add_argument("--print-config", dest="print_config", action="store_true")
    p.add_argument("--cfg", choices=["job"], help="Hydra-style alias of --print-config")
    p.add_argument("--local-rank", "--local_rank", type=int, help=argparse.SUPPRESS)  # legacy torch.distributed.launch
    p.add_argument("overrides", nargs="*")
    return p


def usage(prog: str, config_name: str, config_dirs: Sequence[str] = ()) -> str:
    """The --help text, listing the presets found in the config search path."""
    presets = "\n".join(f"  {name}{'  (default)' if name == config_name else ''}" for name in list_presets(config_dirs))
    return f"""usage: {prog} [--config-file FILE | --config-name NAME] [--output-dir DIR] [--no-resume] [--seed N]
       {' ' * len(prog)} [--checkpoint-dir DIR] [--config-dir DIR] [-m] [--print-config] [key=value ...]

Train with the configuration built from: official DINOv3 defaults <- a YAML file or a preset <- key=value overrides.

options:
  --config-file FILE     a YAML config (e.g. the official recipes or dinov3_vitlarge_pretrain.yaml)
  --config-name NAME     a preset by name (also -cn NAME or the override experiment=NAME); default: {config_name}
  --config-dir DIR       also look for presets in DIR (searched before the built-in ones)
  --output-dir DIR       run directory (train.output_dir); default ./outputs/<preset or file name>
  --no-resume            start from scratch even if DIR has checkpoints (train.resume=false)
  --seed N               train.seed=N
  --checkpoint-dir DIR   where checkpoints go (checkpointing.dir; default <output dir>/ckpt)
  -m, --multirun         run a sweep: every combination of a=1,2 / range(0,3) / choice(x,y) overrides, one after
                         the other, each in <output dir>/<index>_<swept values>
  --print-config         print the resolved config(s) as YAML and exit (also: --cfg job)
  key=value              Hydra-style overrides: optim.lr=1e-3  crops.global_crops_size=[224,256]  ~schedules
                         train.dataset_path=ImageFolder:root=DIR  data.NAME.txt_path=FILE  experiment=NAME

presets:
{presets}

examples:
  {prog}                                            # tiny CPU run on the built-in dataset
  {prog} --config-file dinov3_vitlarge_pretrain.yaml --output-dir /runs/vitl
  torchrun --nproc_per_node=8 -m dinobridge.train --config-name official_vitl16_im1k \\
      train.dataset_path=ImageNet:split=TRAIN:root=/data/imagenet
  {prog} -m optim.lr=1e-3,2e-3 train.seed=0,1          # 4 runs in ./outputs/train/<i>_optim.lr=..._train.seed=..."""


@dataclass
class Job:
    """One run of a launch: its index, the overrides that define it and its validated config."""

    index: int
    overrides: list[str]
    cfg: DictConfig


_UNSAFE = re.compile(r"[^A-Za-z0-9._=+\-]+")


def _job_dirname(index: int, swept: list[str]) -> str:
    name = _UNSAFE.sub("-", "_".join(swept)).strip("-")[:120]
    return f"{index}_{name}" if name else str(index)


def _quoted(key: str, value: str, flag: str) -> str:
    """`key='value'` as a Hydra override that takes `value` literally."""
    for quote in ("'", '"'):
        if quote not in value:
            return f"{key}={quote}{value}{quote}"
    raise ConfigError(f"{flag}: a path with both kinds of quotes is not supported, got {value!r}")


def plan_jobs(
    argv: Sequence[str], config_name: str = "train", prog: str = "dinobridge train"
) -> tuple[argparse.Namespace, list[Job]]:
    """Parse `argv` and build (and validate) the config of every job, before anything runs."""
    args = _parser(prog).parse_intermixed_args(list(argv))
    if args.help:
        return args, []
    if args.config_file and args.config_name:
        raise ConfigError("give either --config-file or --config-name, not both")
    flags = []
    if args.no_resume:
        flags.append("train.resume=false")
    if args.seed is not None:
        flags.append(f"train.seed={args.seed}")
    if args.checkpoint_dir is not None:
        flags.append(_quoted("checkpointing.dir", args.checkpoint_dir, "--checkpoint-dir"))
    parsed = parse_overrides(args.overrides + flags)
    sweeps = [o for o in parsed if o.is_sweep_override()]
    if sweeps and not args.multirun:
        raise ConfigError(f"override '{sweeps[0].input_line}' is a sweep: add -m/--multirun (or quote the value)")

    if args.multirun:
        swept_keys = {o.key_or_group for o in sweeps}
        job_overrides = BasicSweeper.split_arguments(parsed, None)[0]
    else:
        swept_keys, job_overrides = set(), [[o.input_line for o in parsed]]
    jobs = []
    for index, overrides in enumerate(job_overrides):
        job_parsed = parse_overrides(overrides)
        has_preset = any(o.key_or_group == PRESET_KEY for o in job_parsed)
        name = args.config_name or (None if args.config_file or has_preset else config_name)
        subdir = None
        if args.multirun:
            swept = [o for o in job_parsed if o.key_or_group in swept_keys]
            subdir = _job_dirname(index, [f"{o.key_or_group}={o.get_value_element_as_str()}" for o in swept])
        cfg = build_config(
            args.config_file,
            overrides,
            args.output_dir,
            config_name=name,
            config_dirs=args.config_dirs,
            output_subdir=subdir,
        )
        jobs.append(Job(index, list(overrides), cfg))
    return args, jobs


def is_rank_zero() -> bool:
    """Rank 0 of torch.distributed when initialised, else from the RANK environment variable (torchrun sets it)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


def launch(
    argv: Sequence[str],
    run_fn: Callable[[DictConfig], object],
    config_name: str = "train",
    *,
    prog: str = "dinobridge train",
    write_config: bool = True,
) -> int:
    """Parse `argv`, build the job config(s) and call `run_fn(cfg)` for each; returns the process exit code
    (0 ok, 2 for a UserError, printed as one line on stderr). See the module docstring for the accepted forms."""
    try:
        args, jobs = plan_jobs(argv, config_name, prog)
        if args.help:
            print(usage(prog, config_name, args.config_dirs))
            return 0
        if args.print_config or args.cfg == "job":
            for job in jobs:
                if len(jobs) > 1:
                    print(f"# job {job.index}: {' '.join(job.overrides)}")
                print(OmegaConf.to_yaml(job.cfg), end="")
            return 0
        for job in jobs:
            run_dir = Path(job.cfg.train.output_dir)
            if len(jobs) > 1 and is_rank_zero():
                print(f"[{prog}] job {job.index}/{len(jobs)}: {' '.join(job.overrides)} -> {run_dir}", file=sys.stderr)
            if write_config and is_rank_zero():
                path = run_dir / CONFIG_FILENAME
                try:
                    save_config(job.cfg, path)
                except OSError as err:
                    raise UserError(f"train.output_dir: cannot write {path}: {err.strerror}") from None
            run_fn(job.cfg)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0

