"""Run configurations: TOML files naming model, classifier, data and method settings.

A config is looked up by name among the shipped ones (sde_configs/, package sdepure_configs)
or read from a path. Tables: [model] (+ [model.schedule]), [classifier], [data], [method],
[certify]; command-line options override [method] and [certify] values.
"""
from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from .errors import SdepureError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REQUIRED_TABLES = ("classifier", "data")
KNOWN_TABLES = ("model", "classifier", "data", "method", "certify", "attack")


def config_names() -> list[str]:
    root = resources.files("sdepure_configs")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def _locate(spec: str) -> Path:
    p = Path(spec).expanduser()
    if spec.endswith(".toml") or "/" in spec or p.exists():
        if not p.is_file():
            raise SdepureError(f"config file not found: {p}")
        return p
    candidate = Path(str(resources.files("sdepure_configs") / f"{spec}.toml"))
    if not candidate.is_file():
        raise SdepureError(f"unknown config {spec!r}; shipped configs: {', '.join(config_names())}; "
                           f"or give a path to a .toml file")
    return candidate


def load_config(spec: str) -> dict:
    path = _locate(spec)
    try:
        with open(path, "rb") as fh:
            cfg = tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise SdepureError(f"malformed config {path}: {e}") from None
    except OSError as e:
        raise SdepureError(f"cannot read config {path}: {e.strerror}") from None
    for table in REQUIRED_TABLES:
        if not isinstance(cfg.get(table), dict):
            raise SdepureError(f"config {path} lacks the [{table}] table")
    for table in KNOWN_TABLES:
        if table in cfg and not isinstance(cfg[table], dict):
            raise SdepureError(f"config {path}: '{table}' must be a table")
    if "model" in cfg and not isinstance(cfg["model"].get("schedule", {}), dict):
        raise SdepureError(f"config {path}: [model.schedule] must be a table")
    cfg.setdefault("name", path.stem)
    cfg["source"] = str(path)
    return cfg


def merged(cfg: dict, table: str, overrides: dict) -> dict:
    """cfg[table] with every non-None override applied."""
    out = dict(cfg.get(table, {}))
    out.update({k: v for k, v in overrides.items() if v is not None})
    return out
