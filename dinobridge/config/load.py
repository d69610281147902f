"""Build the typed config: structured defaults <- YAML (a file or a preset) <- overrides <- output_dir.

* `--config-file FILE` semantics (official): the official defaults (the schema) merged with a plain YAML file.
* Presets: YAML files at the top of a config dir (the package's `dinobridge/configs/`, plus `config_dirs`), composed
  with Hydra's compose API, so a preset may start with a Hydra defaults list (e.g. `defaults: [train, _self_]`).
  `experiment=NAME` among the overrides is the same as `config_name=NAME`.
* Overrides use Hydra's override grammar (`a.b=1`, `a.b=[1,2]`, `a.b=null`, `~a.b`, `+a.b=1` = `a.b=1`); a value
  containing '=' (dataset strings) is taken literally. Sweeps (`a=1,2`, `range(...)`) need the launcher's --multirun.
* Strict: unknown keys, wrong types, YAML syntax errors and failed checks raise dinobridge.errors.ConfigError with a
  one-line message naming the key (and the file or override).
"""

from __future__ import annotations

import copy
import difflib
import functools
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinobridge.config.merge import delete_key, merge_data
from dinobridge.config.schema import Config
from dinobridge.config.validate import validate_config
from dinobridge.errors import ConfigError

PACKAGE_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRESET_KEY = "experiment"
DEFAULT_OUTPUT_ROOT = "./outputs"


def search_dirs(config_dirs: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Config directories in lookup order: the user's `config_dirs` first, then the package's configs."""
    return [Path(d).expanduser().resolve() for d in config_dirs] + [PACKAGE_CONFIG_DIR]


def list_presets(config_dirs: Sequence[str | os.PathLike] = ()) -> list[str]:
    """Names of the presets (top-level `*.yaml` files) in the config search path, sorted."""
    names = {p.stem for d in search_dirs(config_dirs) if d.is_dir() for p in d.glob("*.yaml")}
    return sorted(names)


def _config_groups(config_dirs: Sequence[str | os.PathLike]) -> set[str]:
    return {p.name for d in search_dirs(config_dirs) if d.is_dir() for p in d.iterdir() if p.is_dir()}


# ------------------------------------------------------------------------------------------------ YAML sources
def _yaml_error(path: str | os.PathLike, err: Exception) -> ConfigError:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    return ConfigError(f"cannot parse YAML {where}: {problem}")


def load_yaml_file(path: str | os.PathLike) -> dict:
    """A YAML config file as a plain dict (interpolations kept); ConfigError with file:line on a syntax error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise _yaml_error(path, err) from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot load {path}: {str(err).strip().splitlines()[0]}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path}: expected a mapping of config sections at the top level, got a list")
    data = OmegaConf.to_container(loaded, resolve=False)
    if "defaults" in data:
        raise ConfigError(
            f"config file {path}: a Hydra 'defaults' list needs a preset; put the file in a config dir and select it "
            "with --config-dir DIR --config-name NAME"
        )
    return data


@contextmanager
def _hydra_context(primary: Path) -> Iterator[None]:
    """Initialise Hydra on `primary` for compose(); restores any Hydra state the caller had."""
    saved = copy.copy(GlobalHydra.instance()) if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(primary), version_base="1.3", job_name="dinobridge"):
            yield
    finally:
        if saved is not None:
            GlobalHydra.set_instance(saved)


def _find_broken_yaml(dirs: Sequence[Path]) -> Optional[ConfigError]:
    for d in dirs:
        for path in sorted(d.rglob("*.yaml")) if d.is_dir() else []:
            try:
                with open(path, encoding="utf-8") as f:
                    yaml.safe_load(f)
            except yaml.YAMLError as err:
                return _yaml_error(path, err)
    return None


def compose_preset(
    name: str, config_dirs: Sequence[str | os.PathLike] = (), group_overrides: Sequence[str] = ()
) -> dict:
    """The preset `name` composed by Hydra (defaults lists resolved) as a plain dict (interpolations kept).

    Compositions are cached per process, keyed by the modification times of the YAML files in the search path, so a
    sweep composes each preset once."""
    presets = list_presets(config_dirs)
    if name not in presets:
        guess = difflib.get_close_matches(name, presets, n=1)
        hint = f" (did you mean '{guess[0]}'?)" if guess else ""
        raise ConfigError(f"unknown preset '{name}'{hint}; presets: {', '.join(presets)}")
    dirs = tuple(d for d in search_dirs(config_dirs) if d.is_dir())
    stamp = tuple((str(p), p.stat().st_mtime_ns) for d in dirs for p in sorted(d.rglob("*.yaml")))
    return copy.deepcopy(_compose(name, dirs, tuple(group_overrides), stamp))


@functools.lru_cache(maxsize=32)
def _compose(name: str, dirs: tuple[Path, ...], group_overrides: tuple[str, ...], stamp: tuple) -> dict:
    extra = [f"file://{d}" for d in dirs[1:]]
    overrides = list(group_overrides) + ([f"hydra.searchpath=[{','.join(extra)}]"] if extra else [])
    try:
        with _hydra_context(dirs[0]):
            composed = compose(config_name=name, overrides=overrides)
    except yaml.YAMLError as err:
        raise _find_broken_yaml(dirs) or _yaml_error(f"preset '{name}'", err) from None
    except (HydraException, MissingConfigException, OmegaConfBaseException) as err:
        raise ConfigError(f"cannot compose preset '{name}': {str(err).strip().splitlines()[0]}") from None
    data = OmegaConf.to_container(composed, resolve=False)
    data.pop("hydra", None)
    return data


# ------------------------------------------------------------------------------------------------ overrides
_PLAIN_OVERRIDE = re.compile(r"^([+~]{0,2}[A-Za-z_][\w.\-]*)=(.*)$", re.DOTALL)


def parse_overrides(overrides: Sequence[str]) -> list[Any]:
    """Parse command-line overrides with Hydra's grammar into `hydra.core.override_parser.types.Override`s.

    A value that Hydra rejects because it contains '=' (e.g. `train.dataset_path=ImageFolder:root=/data`) is retried
    as a quoted string, so such values work without shell-level quoting (but cannot be swept unquoted)."""
    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.append(parser.parse_override(text))
            continue
        except HydraException as err:
            first_error = err
        match = _PLAIN_OVERRIDE.match(text)
        value = match.group(2) if match else ""
        quote = "'" if "'" not in value else '"' if '"' not in value else None
        if match and "=" in value and quote:
            try:
                parsed.append(parser.parse_override(f"{match.group(1)}={quote}{value}{quote}"))
                continue
            except HydraException:
                pass
        message = str(first_error).strip().splitlines()[0]
        raise ConfigError(f"cannot parse override '{text}': {message} (expected key=value, e.g. optim.lr=1e-3)")
    return parsed


def apply_overrides(cfg: DictConfig, overrides: Sequence[Any]) -> None:
    """Apply parsed (non-sweep) overrides to `cfg` in order; ConfigError names the offending override."""
    for override in overrides:
        source = f"override '{override.input_line}'"
        if override.is_sweep_override():
            raise ConfigError(f"{source} is a sweep: run with -m/--multirun, or quote the value to use it literally")
        if override.package is not None:
            raise ConfigError(f"{source}: package overrides (@pkg) are not supported")
        key = override.key_or_group
        if override.is_delete():
            delete_key(cfg, key, source)
            continue
        value = override.value()
        data: Any = value
        for part in reversed(key.split(".")):
            data = {part: data}
        merge_data(cfg, data, source)


def split_overrides(
    overrides: Sequence[Any], config_dirs: Sequence[str | os.PathLike] = ()
) -> tuple[Optional[str], list[str], list[Any]]:
    """(preset from `experiment=NAME`, Hydra config-group overrides, value overrides) of parsed overrides."""
    groups = _config_groups(config_dirs)
    preset, group_overrides, values = None, [], []
    for override in overrides:
        key = override.key_or_group
        if key == PRESET_KEY and not override.is_delete():
            if override.is_sweep_override():
                raise ConfigError(f"override '{override.input_line}' is a sweep: run with -m/--multirun")
            preset = str(override.value())
        elif key in groups:
            group_overrides.append(override.input_line)
        elif key == "hydra" or key.startswith("hydra."):
            raise ConfigError(f"override '{override.input_line}': hydra.* settings are not used by dinobridge")
        else:
            values.append(override)
    return preset, group_overrides, values


# ------------------------------------------------------------------------------------------------ build / save
def _interpolated_keys(data: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _interpolated_keys(value, f"{prefix}{key}.")
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from _interpolated_keys(value, f"{prefix}{index}.")
    elif isinstance(data, str) and "${" in data:
        yield prefix[:-1]


def _resolve(cfg: DictConfig) -> None:
    """Resolve `${...}` interpolations in place; a failure names the key that holds the interpolation."""
    for key in _interpolated_keys(OmegaConf.to_container(cfg, resolve=False)):
        try:
            OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"config key '{key}': {str(err).strip().splitlines()[0]}") from None
    OmegaConf.resolve(cfg)


def _sets_output_dir(data: dict) -> bool:
    train = data.get("train")
    return isinstance(train, dict) and "output_dir" in train


def build_config(
    config_file: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    output_dir: str | os.PathLike | None = None,
    *,
    config_name: str | None = None,
    config_dirs: Sequence[str | os.PathLike] = (),
    output_subdir: str | None = None,
) -> DictConfig:
    """The validated, resolved config (a struct-mode DictConfig of `Config`).

    config_file: a YAML file merged over the official defaults; config_name (or `experiment=NAME` in `overrides`):
    a preset instead (at most one of the two; neither = the official defaults alone). overrides: Hydra-syntax
    `key=value` strings applied in order. output_dir: sets train.output_dir last. When nothing sets
    train.output_dir it defaults to ./outputs/<preset or file stem> (./outputs/default for the bare defaults).
    output_subdir: appended to train.output_dir (the launcher's per-job directory of a sweep).
    """
    parsed = parse_overrides(list(overrides))
    preset, group_overrides, values = split_overrides(parsed, config_dirs)
    if preset is not None:
        if config_name is not None and config_name != preset:
            raise ConfigError(f"preset given twice: config_name '{config_name}' and override '{PRESET_KEY}={preset}'")
        config_name = preset
    if config_file is not None and config_name is not None:
        raise ConfigError(f"give either a config file ({config_file}) or a preset ({config_name}), not both")
    if group_overrides and config_name is None:
        raise ConfigError(f"config-group overrides {group_overrides} need a preset (--config-name)")

    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    data: dict = {}
    if config_file is not None:
        data = load_yaml_file(config_file)
        merge_data(cfg, data, str(config_file))
        run_name = Path(config_file).stem
    elif config_name is not None:
        data = compose_preset(config_name, config_dirs, group_overrides)
        merge_data(cfg, data, f"preset '{config_name}'")
        run_name = config_name
    else:
        run_name = None
    apply_overrides(cfg, values)

    if output_dir is not None:
        cfg.train.output_dir = str(output_dir)
    elif run_name is not None and not _sets_output_dir(data) and not any(
        o.key_or_group == "train.output_dir" for o in values
    ):
        cfg.train.output_dir = f"{DEFAULT_OUTPUT_ROOT}/{run_name}"
    if output_subdir:
        cfg.train.output_dir = os.path.join(cfg.train.output_dir, output_subdir)
    _resolve(cfg)
    validate_config(cfg)
    return cfg


def config_to_container(cfg: DictConfig) -> dict:
    """The config as plain, resolved Python containers (dicts, lists, scalars)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def config_to_object(cfg: DictConfig) -> Config:
    """The config as `Config` dataclass instances (for components that prefer attribute access on dataclasses)."""
    return OmegaConf.to_object(cfg)


def save_config(cfg: DictConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically: temp file + rename); `build_config(path)` reads it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
