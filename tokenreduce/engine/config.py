"""Where the Hydra configuration lives, composing it outside the command line, and reading its parts."""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from tokenreduce.errors import ConfigError
from tokenreduce.reducers import create_reducer, reducer_defaults
from tokenreduce.reducers.base import TokenReducer

CONFIG_PACKAGE = "tokenreduce.conf"
FILE_REDUCER = "from_file.yaml"  # the name a reducer=<file> config takes in its temporary config group


def config_source() -> str:
    """The configuration directory for Hydra: the installed package `tokenreduce.conf`, or the
    repository's `conf/` when running from a source checkout (where that package is not importable)."""
    try:
        installed = importlib.util.find_spec(CONFIG_PACKAGE) is not None
    except ModuleNotFoundError:
        installed = False
    if installed:
        return f"pkg://{CONFIG_PACKAGE}"
    return str(Path(__file__).resolve().parents[2] / "conf")


def config_files_dir() -> Path:
    """The directory holding config.yaml and the groups, as a path on disk."""
    source = config_source()
    if source.startswith("pkg://"):
        return Path(importlib.util.find_spec(CONFIG_PACKAGE).submodule_search_locations[0])
    return Path(source)


OPTIONAL_GROUPS = ("experiment", "sweep")  # defaults that `GROUP=null` leaves out, as documented
FILE_GROUP = "reducer_file"  # the config group through which a reducer file is merged last


def command_line_arguments(args: list[str]) -> list[str]:
    """The command line as Hydra takes it: `experiment=null` (or `sweep=null`) leaves that default
    out (Hydra itself only takes `~experiment`), and `reducer=<file>.yaml` loads a reducer config
    file (`reducer_file_config`)."""
    out, folder = [], None
    for arg in args:
        key, _, value = arg.partition("=")
        if key in OPTIONAL_GROUPS and value == "null":
            out.append(f"~{key}")
            continue
        if key.lstrip("+") != "reducer" or not value.endswith((".yaml", ".yml")):
            out.append(arg)
            continue
        if folder is not None:
            raise ConfigError(f"reducer={value}: a second reducer file; allowed: one")
        if any(a.startswith("hydra.searchpath=") for a in args):
            raise ConfigError(f"reducer={value} adds its own hydra.searchpath; allowed: not both")
        folder = reducer_file_config(value)
        stem = Path(FILE_REDUCER).stem
        out += [f"{key}={stem}", f"+{FILE_GROUP}@reducer={stem}", f"hydra.searchpath=[file://{folder}]"]
    return out


def reducer_file_config(value: str) -> Path:
    """A temporary config folder holding the reducer file `value` as the option `from_file` of the
    groups `reducer` and `reducer_file`. The file configures the reducer and nothing else: a mapping
    of `name` and that reducer's parameters, checked here, with every parameter it leaves out at its
    default. Chosen as the reducer and merged again after the experiment, it is the whole reducer:
    an experiment's own reducer settings do not leak into it (the command line's still apply)."""
    import atexit
    import shutil
    import tempfile

    import yaml

    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"reducer={value}: no such file; allowed: a reducer config file, or a name from "
                          f"{config_files_dir() / 'reducer'}")
    text = path.read_text()
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = str(err).replace('"<unicode string>"', str(path))
        raise ConfigError(f"reducer={value}: not valid YAML ({' '.join(where.split())})") from None
    if re.search(r"^\s*#\s*@package", text, re.MULTILINE):
        raise ConfigError(f"reducer={value}: a '# @package' line; allowed: a reducer config only (name and its "
                          "parameters), which configures the reducer and nothing else")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ConfigError(f"reducer={value}: {type(spec).__name__} without a name; allowed: a mapping with the "
                          "reducer's name and its parameters")
    try:
        defaults = reducer_defaults(spec["name"])
    except ConfigError as err:
        raise ConfigError(f"reducer={value}: {err}") from None
    unknown = sorted(set(spec) - {"name"} - set(defaults))
    if unknown:
        raise ConfigError(f"reducer={value}: {unknown[0]} is not a parameter of {spec['name']}; allowed: "
                          f"{', '.join(defaults) or 'no parameters'}")
    whole = {"name": spec["name"]}
    for key, default in defaults.items():
        if key in spec:
            whole[key] = spec[key]
        elif default is not inspect.Parameter.empty:
            whole[key] = list(default) if isinstance(default, tuple) else default
    folder = Path(tempfile.mkdtemp(prefix="tokenreduce-conf-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    for group in ("reducer", FILE_GROUP):
        (folder / group).mkdir()
        (folder / group / FILE_REDUCER).write_text(f"# from {path.resolve()}\n" + yaml.safe_dump(whole, sort_keys=False))
    return folder


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """The configuration `python -m tokenreduce OVERRIDES...` would run, composed in-process
    (for tests and notebooks), `command_line_arguments` included. Hydra's `hydra:` node is left out."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_files_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=command_line_arguments(list(overrides or [])))


def plain(node):
    """A config node as plain Python values (lists, dicts), resolved."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def settings_of(cls, cfg_node, key: str):
    """The dataclass `cls` filled from the config node `key`; an unknown key is a ConfigError."""
    values = plain(cfg_node) or {}
    allowed = list(cls.__dataclass_fields__)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]} is not a setting; allowed: {', '.join(allowed)}")
    return cls(**values)


def reducer_spec(reducer_cfg: DictConfig | dict) -> tuple[str, dict]:
    """(name, parameters) of the `reducer` config node."""
    spec = plain(reducer_cfg)
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"reducer={spec!r} is invalid; allowed: a reducer config with a 'name' key (conf/reducer/)")
    spec = dict(spec)
    return spec.pop("name"), spec


def build_reducer(reducer_cfg: DictConfig | dict, overrides: list[str] | None = None) -> TokenReducer:
    """The reducer the config names; an unknown name or parameter is a ConfigError.

    overrides: the command line's overrides (Hydra's `overrides.task`; a multirun's sweep values
    among them), None when unknown. When the error comes from parameters the command line did not
    give, e.g. an experiment's `r` kept after `reducer=none`, the message says so and how to drop them.
    """
    name, params = reducer_spec(reducer_cfg)
    try:
        return create_reducer(name, **params)
    except ConfigError as err:
        raise ConfigError(f"{err}{_not_from_command_line(name, params, overrides)}") from None


def _not_from_command_line(name: str, params: dict, overrides: list[str] | None) -> str:
    """"; r=13 was not given on the command line ..." when the reducer builds without the parameters
    the command line did not set (those at their default aside); "" when that is unknown or not so."""
    if overrides is None:
        return ""
    given = {key.split(".")[1] for key in (o.lstrip("~+").split("=", 1)[0] for o in overrides)
             if key.startswith("reducer.")}
    defaults = reducer_defaults(name)
    others = {k: v for k, v in params.items() if k not in given and (k not in defaults or not _same(v, defaults[k]))}
    if not others:
        return ""
    try:  # only blame them if the command line's own values are fine without them
        create_reducer(name, **{k: v for k, v in params.items() if k not in others})
    except ConfigError:
        return ""
    values = ", ".join(f"{k}={v!r}" for k, v in others.items())
    one = len(others) == 1
    return (f"; {values} {'was' if one else 'were'} not given on the command line (the experiment or a config "
            f"file set {'it' if one else 'them'}): drop {'it' if one else 'them'} with "
            f"{' '.join(f'~reducer.{k}' for k in others)}")


def non_default_params(name: str, params: dict) -> dict:
    """The parameters that differ from the reducer's defaults, in declaration order."""
    defaults = reducer_defaults(name)
    return {k: v for k, v in params.items() if k in defaults and not _same(v, defaults[k])}


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def _fmt(value) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(_fmt(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def default_run_name(model_name: str, reducer_name: str, params: dict) -> str:
    """`<model>-<reducer>[-key=value...]` with the reducer's non-default parameters; safe in paths."""
    short_model = model_name.split(".")[0]
    parts = [short_model, reducer_name]
    try:
        changed = non_default_params(reducer_name, params)
    except ConfigError:
        changed = params
    parts += [f"{k}={_fmt(v)}" for k, v in changed.items()]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "-".join(parts))


def top_key(override: str) -> str:
    """The top-level setting a command-line override sets: `reducer.r=2` -> reducer,
    `reducer@text_reducer=tome` -> text_reducer, `~optim.lr` -> optim."""
    key = override.lstrip("+~").split("=", 1)[0]
    return key.split("@")[-1].split(".")[0]
