"""Builds the :class:`~interlingua.server.config.ServerConfig` of ``interlingua serve``.

Four layers, each overriding the one before: the dataclass defaults, a TOML
file (``--config`` or ``INTERLINGUA_CONFIG``), ``INTERLINGUA_*`` environment
variables, then flags. The TOML file takes any field of ``ServerConfig`` at top
level (``data_dir``, ``host``, ``port``, ``metrics_port``, ``api_key``,
``workers``, ``omp_threads``, ``device``, the ``merge_*`` knobs) and the fields of
``Limits`` in a ``[limits]`` table; an unknown key or a value of the wrong type
is a :class:`ConfigError` (exit code 2), never silently ignored. Metrics are
disabled by ``metrics_port = false`` (TOML), ``INTERLINGUA_METRICS_PORT=off``
or ``--no-metrics``; port 0 means "any free port". Covered by ``tests/test_cli.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from interlingua.server.config import Limits, ServerConfig

__all__ = ["ENV_VARS", "ConfigError", "build_server_config"]

#: Environment variable -> ServerConfig field (INTERLINGUA_CONFIG names the TOML file).
ENV_VARS = {
    "INTERLINGUA_DATA_DIR": "data_dir",
    "INTERLINGUA_HOST": "host",
    "INTERLINGUA_PORT": "port",
    "INTERLINGUA_METRICS_PORT": "metrics_port",
    "INTERLINGUA_API_KEY": "api_key",
    "INTERLINGUA_WORKERS": "workers",
    "INTERLINGUA_DEVICE": "device",
}
_OFF = frozenset({"off", "none", "false", "disabled"})


class ConfigError(ValueError):
    """The server configuration is invalid: unknown key, wrong type, unreadable file."""


def _defaults(cls: type[Any]) -> dict[str, Any]:
    """Field name -> default value of a dataclass with defaults for every field."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _coerce(name: str, value: Any, default: Any, source: str, *, text: bool = False) -> Any:
    """``value`` checked (and converted) against the type of the field's default.

    With ``text`` (environment variables) a string is parsed first; TOML values
    must already have the right type.
    """
    if name == "metrics_port" and (value is False or (text and value.lower() in _OFF)):
        return None
    if text and not isinstance(default, str | Path) and default is not None:
        value = _parse_text(name, value, default, source)
    if isinstance(default, Path) and isinstance(value, str | Path):
        return Path(value)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int) or name == "metrics_port":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:  # str, or None for optional text (api_key)
        ok = isinstance(value, str)
    if not ok:
        want = "a path" if isinstance(default, Path) else type(default).__name__ if default is not None else "str"
        raise ConfigError(f"{source}: {name} must be {want}, got {value!r}")
    return value


def _parse_text(name: str, text: str, default: Any, source: str) -> Any:
    try:
        if isinstance(default, bool):
            return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[text.lower()]
        return float(text) if isinstance(default, float) else int(text)
    except (KeyError, ValueError):
        raise ConfigError(f"{source}: {name}: cannot parse {text!r}") from None


def _from_toml(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ServerConfig fields, Limits fields) read from a TOML file."""
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    limits = doc.pop("limits", {})
    if not isinstance(limits, dict):
        raise ConfigError(f"{path}: limits must be a table")
    server_defaults, limit_defaults = _defaults(ServerConfig), _defaults(Limits)
    server_defaults.pop("limits")
    return _checked(doc, server_defaults, str(path)), _checked(limits, limit_defaults, f"{path} [limits]")


def _checked(values: Mapping[str, Any], defaults: Mapping[str, Any], source: str) -> dict[str, Any]:
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(defaults))}")
    return {k: _coerce(k, v, defaults[k], source) for k, v in values.items()}


def build_server_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """The ServerConfig of ``interlingua serve``: defaults < TOML < environment < flags.

    ``args`` holds the serve flags (``None`` where not given); ``environ``
    defaults to ``os.environ``. Raises :class:`ConfigError` for bad input.
    """
    env = os.environ if environ is None else environ
    defaults = _defaults(ServerConfig)
    values: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    config_path = args.config or env.get("INTERLINGUA_CONFIG")
    if config_path:
        values, limits = _from_toml(Path(config_path))
    for var, name in ENV_VARS.items():
        if env.get(var):  # set and non-empty
            values[name] = _coerce(name, env[var], defaults[name], var, text=True)
    for name in ("data_dir", "host", "port", "metrics_port", "api_key", "workers", "omp_threads", "device"):
        flag = getattr(args, name, None)
        if flag is not None:
            values[name] = _coerce(name, flag, defaults[name], "--" + name.replace("_", "-"))
    if getattr(args, "no_metrics", False):
        values["metrics_port"] = None
    try:
        return ServerConfig(**values, limits=Limits(**limits))
    except (TypeError, ValueError) as err:  # a __post_init__ check, if the server adds one
        raise ConfigError(str(err)) from None
