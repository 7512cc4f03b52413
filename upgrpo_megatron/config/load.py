"""Recipes in and out: YAML (+ `inherit`) and `dotted.key=value` overrides -> a validated `RecipeConfig`.

A recipe may start with `inherit: other.yaml` (a path relative to the recipe) and override only what differs.
Every key must be declared in `schema.py`; an unknown key, a wrong type, a non-finite number, a duplicated
key, an empty file or a file that is not UTF-8 is a `ConfigError` naming the key (or line) and the file, with
a suggestion for typos.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from upgrpo_megatron.config.schema import ConfigError, ModelConfig, RecipeConfig, to_dict
from upgrpo_megatron.config.validate import validate


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _finite(value: float, key: str, where: str) -> float:
    # inf/nan pass every range check (inf > 0) and then silently diverge a run: refuse them here
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} in {where}: must be a finite number")
    return value


def _coerce(value: Any, tp, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, where)
    if origin in (list, List):
        (inner,) = typing.get_args(tp)
        if inner is str and isinstance(value, str):
            value = [value]  # `data.train_files=a.parquet` means a list of one file
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} in {where}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} in {where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} in {where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                number = float(value) if isinstance(value, str) else None  # YAML reads 1e-6 (no dot) as a string
            except ValueError:
                number = None
            if number is None:
                raise ConfigError(f"{key} in {where}: expected a number, got {value!r}")
            return _finite(number, key, where)
        return _finite(float(value), key, where)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} in {where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key} in {where}: unsupported type {_type_name(tp)}")


def _merge_into(obj, data: Dict[str, Any], where: str, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'} in {where}: expected a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(obj) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            known = [f"{prefix}{k}" for k in fields]
            close = difflib.get_close_matches(full, known, n=1, cutoff=0.6)
            if close:
                hint = f" — did you mean '{close[0]}'?"
            else:
                hint = f" (known keys: {', '.join(k.split('.')[-1] for k in known)})"
            raise ConfigError(f"unknown key '{full}' in {where}{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge_into(current, value if value is not None else {}, where, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full, where))


def _refuse_duplicate_keys(node, path: Path) -> None:
    """`yaml.safe_load` keeps the last of two equal keys without a word: a recipe with a section written twice
    would silently lose the first one's settings. Refuse it, naming both lines."""
    if isinstance(node, yaml.MappingNode):
        seen: Dict[str, int] = {}
        for key_node, value_node in node.value:
            key = getattr(key_node, "value", None)
            if isinstance(key, str) and key in seen:
                raise ConfigError(f"{path} line {key_node.start_mark.line + 1}: '{key}' appears twice (first on "
                                  f"line {seen[key] + 1}); merge the two")
            seen[key] = key_node.start_mark.line
            _refuse_duplicate_keys(value_node, path)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, path)


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"recipe file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"recipe {path} is a directory, not a YAML file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path} line {line}: not UTF-8 text (byte 0x{path.read_bytes()[e.start]:02x})") from None
    except OSError as e:
        raise ConfigError(f"recipe {path} cannot be read: {e.strerror}") from None
    try:
        _refuse_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), path)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: malformed YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        raise ConfigError(f"{path}: the recipe is empty (write at least `inherit: qwen_moe.yaml` or one section)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def _load_layers(path: Path, seen: Sequence[Path] = ()) -> List[tuple]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'inherit' forms a cycle")
    data = _read_yaml(path)
    parent = data.pop("inherit", None)
    layers = []
    if parent is not None:
        layers = _load_layers((path.parent / str(parent)), [*seen, path])
    return layers + [(data, str(path))]


def parse_override(text: str) -> tuple:
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected dotted.key=value, e.g. actor.lr=1e-6")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_recipe(path, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Load a recipe (following `inherit`), apply `dotted.key=value` overrides, validate."""
    cfg = RecipeConfig()
    for data, where in _load_layers(Path(path)):
        _merge_into(cfg, data, where)
    for text in overrides:
        key, value = parse_override(text)
        nested: Dict[str, Any] = {}
        node = nested
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        _merge_into(cfg, nested, f"override '{text}'")
    cfg.source = str(path)
    validate(cfg)
    return cfg


def from_dict(data: Dict[str, Any], where: str = "<dict>") -> RecipeConfig:
    cfg = RecipeConfig()
    _merge_into(cfg, data, where)
    validate(cfg)
    return cfg


def model_config_from_dict(data: Dict[str, Any], where: str) -> ModelConfig:
    """A model section stored as a mapping (a checkpoint's model_config.yaml, a `.pt` file's metadata) ->
    `ModelConfig`, the one reading boundary (written back with `dataclasses.asdict`). Missing keys take their
    defaults; an unknown key or a value of the wrong type is a `ConfigError` naming the key and `where`."""
    cfg = ModelConfig()
    _merge_into(cfg, data, where, "model.")
    return cfg


def read_model_config(path) -> ModelConfig:
    """A checkpoint's model_config.yaml (written as `yaml.safe_dump(dataclasses.asdict(cfg))`) as a ModelConfig."""
    path = Path(path)
    return model_config_from_dict(yaml.safe_load(path.read_text()) or {}, str(path))


def resolved_yaml(cfg: RecipeConfig) -> str:
    """The resolved config as YAML text (what `--print-config` shows and `config.yaml` holds)."""
    return f"# resolved from {cfg.source}\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_resolved(cfg: RecipeConfig, path, *, step: int = 0) -> Optional[Path]:
    """Write the resolved config atomically. A different config already there (a run resumed with other
    settings) is kept as `config.before_step_K.yaml` rather than overwritten; returns that path if any."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = resolved_yaml(cfg)
    kept = None
    if path.exists():
        old = path.read_text()
        if old.split("\n", 1)[-1] == text.split("\n", 1)[-1]:
            return None
        kept = path.with_name(f"{path.stem}.before_step_{step}{path.suffix}")
        n = 1
        while kept.exists():
            kept = path.with_name(f"{path.stem}.before_step_{step}.{n}{path.suffix}")
            n += 1
        kept.write_text(old)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return kept
