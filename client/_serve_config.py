"""Builds the :class:`~interlingua.server.config.ServerConfig` of ``interlingua serve``.

Four layers, each overriding the one before: the dataclass defaults, a TOML
file (``--config`` or ``INTERLINGUA_CONFIG``), ``INTERLINGUA_*`` environment
variables, then flags. The TOML file takes any field of ``ServerConfig`` at top
level (``data_dir``, ``host``, ``port``, ``metrics_port``, ``api_key``,
``workers``, ``omp_threads``, ``device``, the ``merge_*`` knobs) and the fields of
``Limits`` in a ``[limits]`` table; security has its own tables: ``[tls]``
(``cert``, ``key``, optional ``client_ca``), ``[rate_limit]`` (``per_second``,
``burst``) and ``[[keys]]`` (``name``, ``sha256``, ``role``, optional
``rate_per_second``), plus ``metrics_auth``. An unknown key or a value of the wrong
type is a :class:`ConfigError` (exit code 2), never silently ignored. Metrics are
disabled by ``metrics_port = false`` (TOML), ``INTERLINGUA_METRICS_PORT=off``
or ``--no-metrics``; port 0 means "any free port". Covered by ``tests/test_cli.py``
and ``tests/test_security.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from interlingua.server.config import ApiKey, Limits, RateLimit, ServerConfig, TLSConfig

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
    "INTERLINGUA_BACKEND": "backend",
    "INTERLINGUA_MILVUS_URI": "milvus_uri",
    "INTERLINGUA_REGISTRY": "registry",
    "INTERLINGUA_METRICS_AUTH": "metrics_auth",
    "INTERLINGUA_MIN_RETENTION": "min_retention",
    "INTERLINGUA_MAX_NEGATIVE_FLIP_RATE": "max_negative_flip_rate",
    "INTERLINGUA_REQUIRE_ECC": "require_ecc",
}
#: Environment variable -> field of the [tls] and [rate_limit] tables.
TLS_ENV = {"INTERLINGUA_TLS_CERT": "cert", "INTERLINGUA_TLS_KEY": "key", "INTERLINGUA_TLS_CLIENT_CA": "client_ca"}
RATE_ENV = {"INTERLINGUA_RATE_LIMIT": "per_second", "INTERLINGUA_RATE_BURST": "burst"}
_TABLES = ("limits", "tls", "rate_limit", "keys")
_TLS_DEFAULTS: dict[str, Any] = {"cert": Path(), "key": Path(), "client_ca": Path()}
_KEY_DEFAULTS: dict[str, Any] = {"name": "", "sha256": "", "role": "", "rate_per_second": 0.0}
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


@dataclasses.dataclass
class _Layers:
    """Values gathered from the TOML file, the environment and flags, by table."""

    server: dict[str, Any] = dataclasses.field(default_factory=dict)
    limits: dict[str, Any] = dataclasses.field(default_factory=dict)
    tls: dict[str, Any] = dataclasses.field(default_factory=dict)
    rate_limit: dict[str, Any] = dataclasses.field(default_factory=dict)
    keys: tuple[ApiKey, ...] = ()


def _table(doc: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    table = doc.pop(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {name} must be a table")
    return table


def _keys(doc: dict[str, Any], path: Path) -> tuple[ApiKey, ...]:
    entries = doc.pop("keys", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{path}: keys must be an array of tables ([[keys]])")
    out = []
    for i, entry in enumerate(entries):
        source = f"{path} [[keys]] #{i + 1}"
        values = _checked(entry, _KEY_DEFAULTS, source)
        missing = sorted({"name", "sha256"} - set(values))
        if missing:
            raise ConfigError(f"{source}: missing {', '.join(missing)}")
        try:
            out.append(ApiKey(**values))
        except ValueError as err:
            raise ConfigError(f"{source}: {err}") from None
    names = [k.name for k in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: two [[keys]] share a name")
    return tuple(out)


def _from_toml(path: Path) -> _Layers:
    """The tables of a TOML file, checked."""
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    limits, tls, rate = (_table(doc, name, path) for name in ("limits", "tls", "rate_limit"))
    keys = _keys(doc, path)
    server_defaults = {k: v for k, v in _defaults(ServerConfig).items() if k not in _TABLES}
    return _Layers(
        server=_checked(doc, server_defaults, str(path)),
        limits=_checked(limits, _defaults(Limits), f"{path} [limits]"),
        tls=_checked(tls, _TLS_DEFAULTS, f"{path} [tls]"),
        rate_limit=_checked(rate, _defaults(RateLimit), f"{path} [rate_limit]"),
        keys=keys,
    )


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
    config_path = args.config or env.get("INTERLINGUA_CONFIG")
    layers = _from_toml(Path(config_path)) if config_path else _Layers()
    values = layers.server
    for var, name in ENV_VARS.items():
        if env.get(var):  # set and non-empty
            values[name] = _coerce(name, env[var], defaults[name], var, text=True)
    for table, env_vars, table_defaults in (
        (layers.tls, TLS_ENV, _TLS_DEFAULTS),
        (layers.rate_limit, RATE_ENV, _defaults(RateLimit)),
    ):
        for var, name in env_vars.items():
            if env.get(var):
                table[name] = _coerce(name, env[var], table_defaults[name], var, text=True)
    flags = (
        "data_dir",
        "host",
        "port",
        "metrics_port",
        "api_key",
        "workers",
        "omp_threads",
        "device",
        "backend",
        "milvus_uri",
        "registry",
    )
    for name in (*flags, "min_retention", "max_negative_flip_rate", "require_ecc"):
        flag = getattr(args, name, None)
        if flag is not None:
            values[name] = _coerce(name, flag, defaults[name], "--" + name.replace("_", "-"))
    for name in ("cert", "key", "client_ca"):
        flag = getattr(args, f"tls_{name}", None)
        if flag is not None:
            layers.tls[name] = Path(flag)
    if getattr(args, "no_metrics", False):
        values["metrics_port"] = None
    if getattr(args, "metrics_auth", False):
        values["metrics_auth"] = True
    try:
        return ServerConfig(
            **values,
            limits=Limits(**layers.limits),
            tls=_tls(layers.tls),
            rate_limit=RateLimit(**layers.rate_limit),
            keys=layers.keys,
        )
    except (TypeError, ValueError) as err:  # a __post_init__ check
        raise ConfigError(str(err)) from None


def _tls(values: dict[str, Any]) -> TLSConfig | None:
    if not values:
        return None
    if "cert" not in values or "key" not in values:
        raise ConfigError("tls: give both cert and key (client_ca is optional)")
    return TLSConfig(**values)
