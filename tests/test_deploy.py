"""deploy/ and packaging, checked offline (no Docker engine, no helm binary here).

- The wheel holds every module of proto/interlingua/, server/ and client/, and installed alone
  it imports them all and loads the ``interlingua`` entry point (setup.py finds the packages).
- deploy/Dockerfile: non-root user owning a data VOLUME, ``pip install .`` (not editable), torch
  pinned as in pyproject.toml, a HEALTHCHECK through the gRPC health service; its CLI calls
  parse with the real parser and its environment names are ones ``interlingua serve`` reads.
- deploy/compose.yaml and deploy/compose.milvus.yaml validate against the compose-spec schema that
  check-jsonschema ships; images are pinned, passwords come from the environment with no default,
  Prometheus scrapes every front-end. The milvus file's front-ends are built with EXTRAS=milvus (a
  real extra holding pymilvus; the Dockerfile's ``pip install`` target is expanded by ``sh``), run
  ``serve --backend milvus --milvus-uri ...`` as the real parser and config read it, each on its own
  volume, once the Milvus standalone is healthy, which waits on etcd and MinIO in turn.
- deploy/helm/interlingua renders with a small Go-template subset (:func:`render_chart`) and
  the manifests validate against the Kubernetes schemas of kubernetes-validate, strictly (no
  unknown fields), at the chart's oldest and the newest Kubernetes version it ships.
- deploy/grafana/interlingua.json names only metrics that a running server exports.
- deploy/k8s/MILVUS.md: its ``helm install`` lines for the chart set only keys the chart has and
  render valid manifests whose environment ``interlingua serve`` reads as ``--backend milvus
  --milvus-uri``; its image is the one its ``docker build`` makes; its NetworkPolicy is valid and
  admits the front-ends to the Milvus port only.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import start_server
from prometheus_client.metrics_core import Metric

from interlingua.client._serve_config import ENV_VARS, build_server_config
from interlingua.client.cli import build_parser
from interlingua.server.etcd import parse_registry_uri

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "interlingua"
#: Source folder -> installed package folder (setup.py's ROOTS, as paths).
SOURCE_ROOTS = {"proto/interlingua": "interlingua", "server": "interlingua/server", "client": "interlingua/client"}
#: Environment variables the service reads besides ENV_VARS (TOML file; client target).
OTHER_ENV = {"INTERLINGUA_CONFIG", "INTERLINGUA_TARGET"}


def _pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


# --- packaging --------------------------------------------------------------------------------


def _source_files() -> set[str]:
    """Installed paths (interlingua/...) of every module, stub, .proto and py.typed in the sources."""
    out = set()
    for src, dst in SOURCE_ROOTS.items():
        for f in (ROOT / src).rglob("*"):
            if (f.suffix in {".py", ".pyi", ".proto"} or f.name == "py.typed") and "__pycache__" not in f.parts:
                out.add(f"{dst}/{f.relative_to(ROOT / src).as_posix()}")
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the package's sources (no stale build/ of the work tree)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in ("proto", "server", "client"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    (whl,) = tmp.glob("interlingua-*.whl")
    return whl


def test_wheel_holds_every_module(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = _source_files()
    assert "interlingua/server/transforms/__init__.py" in expected
    missing = sorted(expected - names)
    assert not missing, f"left out of the wheel: {missing}"
    extra = sorted(n for n in names - expected if not n.startswith("interlingua-"))
    assert not extra, f"in the wheel but not in the sources: {extra}"


_IMPORT_ALL = """
import importlib, importlib.metadata as md, pkgutil, sys
site = sys.argv[1]
import interlingua
names = [m.name for m in pkgutil.walk_packages(interlingua.__path__, "interlingua.")]
for n in names:
    importlib.import_module(n)
# the work tree's editable install must not stand in for a module the wheel lacks
mods = [m for n, m in sys.modules.items() if n == "interlingua" or n.startswith("interlingua.")]
outside = [m.__name__ for m in mods if not (m.__file__ or "").startswith(site)]
assert not outside, f"imported from outside the installed wheel: {outside}"
(ep,) = [e for d in md.distributions(path=[site]) for e in d.entry_points
         if e.group == "console_scripts" and e.name == "interlingua"]
assert callable(ep.load())
print(len(names))
"""


def test_installed_wheel_imports_everything_and_its_entry_point(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure wheel: unpacking is installing it
    env = {"PYTHONPATH": str(site), "PATH": str(Path(sys.executable).parent), "OPENBLAS_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, str(site)], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    n_modules = sum(1 for f in _source_files() if f.endswith(".py") and not f.endswith("__init__.py"))
    assert int(r.stdout.split()[-1]) >= n_modules


# --- Dockerfile -------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    logical = ""
    for line in path.read_text().splitlines():
        if not logical and (not line.strip() or line.lstrip().startswith("#")):
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        word, _, rest = logical.strip().partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        logical = ""
    return out


def _stages(path: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions(path):
        if ins[0] == "FROM":
            stages.append([])
        stages[-1].append(ins)
    return stages


def _env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in instructions:
        if word == "ENV":
            for pair in rest.split():
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def test_dockerfile_runs_as_non_root_with_a_writable_volume() -> None:
    *_, final = _stages(DEPLOY / "Dockerfile")
    words = [w for w, _ in final]
    user = dict(final)["USER"].split(":")[0]
    assert user not in {"root", "0"}
    (volume,) = json.loads(dict(final)["VOLUME"])
    assert volume == _env(final)["INTERLINGUA_DATA_DIR"]
    # created and chowned to the user in a RUN before VOLUME (a fresh named volume copies that)
    runs = [rest for w, rest in final[: words.index("VOLUME")] if w == "RUN"]
    assert any(f"chown -R {user}:" in r and volume.rsplit("/", 1)[0] in r for r in runs), runs
    assert any(f"mkdir -p {volume}" in r for r in runs)
    assert words.index("USER") > max(i for i, w in enumerate(words) if w in {"RUN", "COPY"})


def test_dockerfile_installs_the_package_with_pinned_cpu_torch() -> None:
    build, _final = _stages(DEPLOY / "Dockerfile")
    args = dict(rest.split("=", 1) for w, rest in build if w == "ARG")
    torch_pin = next(d for d in _pyproject()["project"]["dependencies"] if d.startswith("torch=="))
    assert f"torch=={args['TORCH_VERSION']}" == torch_pin
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    runs = " ".join(rest for w, rest in build if w == "RUN")
    assert re.search(r'pip install "\.\$\{EXTRAS:\+\[\$EXTRAS\]\}"( |$)', runs) and "pip install -e" not in runs
    assert args["EXTRAS"] == '""'  # the package alone by default, as before the milvus extra
    assert '"torch==$TORCH_VERSION"' in runs
    # everything setup.py/pyproject.toml read is copied, and the context lets it through
    copied = {src for w, rest in build if w == "COPY" for src in rest.split()[:-1]}
    needed = {"pyproject.toml", "setup.py", "README.md", "proto", "server", "client"}
    assert needed <= copied, needed - copied
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"  # nothing but what is let through: not .venv/, data/, .git/
    assert needed <= {line.strip("!/") for line in ignore if line.startswith("!")}


def test_dockerfile_health_check_and_entrypoint_use_the_real_cli() -> None:
    *_, final = _stages(DEPLOY / "Dockerfile")
    env = _env(final)
    assert set(k for k in env if k.startswith("INTERLINGUA_")) <= set(ENV_VARS) | OTHER_ENV
    healthcheck = dict(final)["HEALTHCHECK"]
    cmd = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert cmd[0] == "interlingua"
    args = build_parser().parse_args(cmd[1:])
    assert args.command == "health" and args.target == f"127.0.0.1:{env['INTERLINGUA_PORT']}"
    entry = json.loads(dict(final)["ENTRYPOINT"])
    assert entry[0] == "interlingua" and build_parser().parse_args(entry[1:]).command == "serve"
    assert env["INTERLINGUA_HOST"] == "0.0.0.0"  # reachable from outside the container
    assert sorted(dict(final)["EXPOSE"].split()) == sorted([env["INTERLINGUA_PORT"], env["INTERLINGUA_METRICS_PORT"]])


# --- compose ----------------------------------------------------------------------------------

#: deploy/compose.yaml (one embedded server) and deploy/compose.milvus.yaml (front-ends over Milvus)
COMPOSE_FILES = ("compose.yaml", "compose.milvus.yaml")
#: The Milvus address the milvus compose file's front-ends are given (issue 14's deploy layout)
MILVUS_COMPOSE_URI = "http://milvus-standalone:19530"


def _compose(name: str = "compose.yaml") -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / name).read_text())
    return doc


def _front_ends(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services built from deploy/Dockerfile: Interlingua servers."""
    return {n: s for n, s in doc["services"].items() if s.get("build", {}).get("dockerfile") == "deploy/Dockerfile"}


def _final_stage_env() -> dict[str, str]:
    *_, final = _stages(DEPLOY / "Dockerfile")
    return _env(final)


def test_every_yaml_file_parses() -> None:
    files = [*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]
    templates = CHART / "templates"
    assert len(files) >= 8
    for f in files:
        if templates not in f.parents:  # templates are YAML only once rendered (below)
            list(yaml.safe_load_all(f.read_text()))


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_matches_the_compose_spec(name: str) -> None:
    schema = json.loads((resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(_compose(name))]
    assert not errors
    # the schema catches a misspelt key
    broken = _compose(name)
    broken["services"]["grafana"]["enviroment"] = {}
    assert any("enviroment" in e.message for e in validator.iter_errors(broken))


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_pins_images_and_takes_secrets_from_the_environment(name: str) -> None:
    services = _compose(name)["services"]
    for svc_name, svc in services.items():
        image = svc["image"]
        assert re.fullmatch(r"[\w./-]+:[\w.-]+(@sha256:[0-9a-f]{64})?", image), f"{svc_name}: unpinned {image}"
        assert not image.split("@")[0].endswith(":latest"), svc_name
        for key, value in svc.get("environment", {}).items():
            if re.search(r"PASSWORD|KEY|TOKEN|SECRET", key):  # never a literal in the file
                assert re.fullmatch(r"\$\{\w+:[?-][^}]*\}", str(value)), f"{svc_name}: {key}={value}"
            if re.search(r"PASSWORD|SECRET", key):  # and no default either: compose refuses to start
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), f"{svc_name}: {key}={value}"
    password = services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", password), "set from the environment, no default"
    front_ends = _front_ends(_compose(name))
    assert front_ends
    version = _pyproject()["project"]["version"]
    for svc in front_ends.values():
        assert svc["image"] == f"interlingua:{version}" or svc["image"].startswith(f"interlingua:{version}-")
        assert set(svc.get("environment", {})) <= set(ENV_VARS) | OTHER_ENV


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_mounts_exist_and_prometheus_scrapes_the_metrics_port(name: str) -> None:
    doc = _compose(name)
    services = doc["services"]
    for svc in services.values():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).is_file(), volume
            else:
                assert source in doc["volumes"], f"named volume {source} not declared"
    metrics_port = _final_stage_env()["INTERLINGUA_METRICS_PORT"]
    (config,) = [
        v.split(":")[0]
        for v in services["prometheus"]["volumes"]
        if v.split(":")[1] == "/etc/prometheus/prometheus.yml"
    ]
    prometheus = yaml.safe_load((DEPLOY / config).read_text())
    jobs = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in prometheus["scrape_configs"]
    }
    assert sorted(jobs.pop("interlingua")) == sorted(f"{n}:{metrics_port}" for n in _front_ends(doc))
    for targets in jobs.values():  # the others scrape services of the same file
        assert all(t.split(":")[0] in services for t in targets), targets
    grafana = services["grafana"]
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning.yaml").read_text())["providers"][0]
    dashboards = [v.split(":")[1] for v in grafana["volumes"] if v.startswith("./grafana/interlingua.json")]
    assert [str(Path(d).parent) for d in dashboards] == [provider["options"]["path"]]


def check_uri(uri: str) -> str:
    """The server's own check of a Milvus uri (``server/backends``, issue 14), imported here so that the
    rest of this file does not depend on the milvus backend's modules."""
    from interlingua.server.backends.milvus_schema import check_uri as server_check_uri

    return server_check_uri(uri)


def _host(address: str) -> str:
    """The host of ``scheme://host:port`` or ``host:port``."""
    return address.split("://")[-1].split(":")[0]


def test_compose_milvus_front_ends_serve_on_the_milvus_standalone_once_it_is_healthy() -> None:
    doc = _compose("compose.milvus.yaml")
    services = doc["services"]
    front_ends = _front_ends(doc)
    assert len(front_ends) >= 2
    milvus_name = _host(MILVUS_COMPOSE_URI)
    *_, final = _stages(DEPLOY / "Dockerfile")
    entry = json.loads(dict(final)["ENTRYPOINT"])
    env = _final_stage_env()
    extras = _pyproject()["project"]["optional-dependencies"]
    data_volumes, host_ports, registries = set(), set(), set()
    for name, svc in front_ends.items():
        # the image holds the milvus extra: a build arg the Dockerfile declares, naming a real extra
        (extra,) = svc["build"]["args"]["EXTRAS"].split(",")
        assert "ARG EXTRAS=" in (DEPLOY / "Dockerfile").read_text()
        assert any(d.startswith("pymilvus==") for d in extras[extra]), extras.get(extra)
        # `interlingua serve --backend milvus --milvus-uri ...`, parsed by the real CLI and config
        args = build_parser().parse_args([*entry[1:], *svc["command"]])
        assert (args.command, args.backend, args.milvus_uri) == ("serve", "milvus", MILVUS_COMPOSE_URI), name
        config = build_server_config(args, {})
        assert (config.backend, config.milvus_uri) == ("milvus", MILVUS_COMPOSE_URI)
        assert check_uri(config.milvus_uri) == MILVUS_COMPOSE_URI  # an address, not a Milvus Lite file
        registries.add(config.registry)  # one shared registry (checked against Milvus' etcd below)
        # started once Milvus answers its health check
        assert svc["depends_on"][milvus_name] == {"condition": "service_healthy"}, name
        # its own data volume (SQLite store: collection rows, spaces, routes, transforms) and port
        (volume,) = svc["volumes"]
        source, target = volume.split(":")
        assert target == env["INTERLINGUA_DATA_DIR"] and source not in data_volumes
        data_volumes.add(source)
        (port,) = svc["ports"]
        host, container = port.rsplit(":", 1)
        assert container == env["INTERLINGUA_PORT"] and host.startswith("127.0.0.1:") and host not in host_ports
        host_ports.add(host)
    milvus = services[milvus_name]
    assert re.fullmatch(r"milvusdb/milvus:v\d+\.\d+\.\d+", milvus["image"])
    assert milvus["command"] == ["milvus", "run", "standalone"]
    assert "ports" not in milvus  # no authentication: reachable on the compose network only
    assert ":9091/healthz" in " ".join(milvus["healthcheck"]["test"])
    # Milvus finds etcd and MinIO by service name, with MinIO's own credentials, once they are healthy
    menv = milvus["environment"]
    etcd, minio = _host(menv["ETCD_ENDPOINTS"]), _host(menv["MINIO_ADDRESS"])
    assert menv["MINIO_ACCESS_KEY_ID"] == services[minio]["environment"]["MINIO_ROOT_USER"]
    assert menv["MINIO_SECRET_ACCESS_KEY"] == services[minio]["environment"]["MINIO_ROOT_PASSWORD"]
    assert milvus["depends_on"] == {etcd: {"condition": "service_healthy"}, minio: {"condition": "service_healthy"}}
    # the front-ends share one registry in Milvus' own etcd, under a prefix of their own, once it is healthy
    (registry,) = registries
    endpoints, prefix = parse_registry_uri(registry)
    assert endpoints == [menv["ETCD_ENDPOINTS"]] and prefix == "/interlingua/"
    for svc in front_ends.values():
        assert svc["depends_on"][etcd] == {"condition": "service_healthy"}
    for svc in services.values():  # a service others wait on being healthy has a health check
        depends = svc.get("depends_on", {})
        for dep in depends if isinstance(depends, dict) else []:
            if depends[dep].get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], dep
    # Prometheus scrapes Milvus on the port of its health check too
    prometheus = yaml.safe_load((DEPLOY / "prometheus.milvus.yml").read_text())
    milvus_job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "milvus")
    assert milvus_job["static_configs"][0]["targets"] == [f"{milvus_name}:9091"]


@pytest.mark.parametrize(("extras", "target"), [(None, "."), ("milvus", ".[milvus]")])
def test_dockerfile_extras_arg_expands_to_the_pip_install_target(extras: str | None, target: str) -> None:
    """The build stage's ``pip install`` argument, expanded by a POSIX shell as RUN does."""
    build, _final = _stages(DEPLOY / "Dockerfile")
    args = dict(rest.split("=", 1) for w, rest in build if w == "ARG")
    value = args["EXTRAS"].strip('"') if extras is None else extras  # None: the Dockerfile's default
    runs = " ".join(rest for w, rest in build if w == "RUN")
    (argument,) = re.findall(r'pip install ("\.[^"]*")', runs)
    out = subprocess.run(
        ["sh", "-c", f"printf %s {argument}"], env={"EXTRAS": value}, capture_output=True, text=True, check=True
    )
    assert out.stdout == target


# --- Helm chart: a Go-template subset, rendered and validated ----------------------------------

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_WORD = re.compile(r'"(?:[^"\\]|\\.)*"|[^\s|]+|\|')


def _truthy(v: Any) -> bool:
    return v not in (None, False, 0, "") and not (isinstance(v, dict | list) and not v)


def _to_yaml(v: Any) -> str:
    return str(yaml.safe_dump(v, default_flow_style=False, sort_keys=True)).rstrip("\n")


_FUNCS: dict[str, Any] = {
    "quote": lambda v: json.dumps(v if isinstance(v, str) else _scalar(v)),
    "default": lambda fallback, v: v if _truthy(v) else fallback,
    "not": lambda v: not _truthy(v),
    "eq": lambda a, b: a == b,
    "sha256sum": lambda s: hashlib.sha256(s.encode()).hexdigest(),
    "toYaml": _to_yaml,
    "indent": lambda n, s: "\n".join(" " * n + line for line in s.split("\n")),
    "nindent": lambda n, s: "\n" + "\n".join(" " * n + line for line in s.split("\n")),
}


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str | int | float):
        return str(v)
    raise ValueError(f"cannot print {v!r} (a missing value, or a map without toYaml)")


def _pipeline(text: str, ctx: dict[str, Any]) -> Any:
    """Evaluates ``arg | fn arg | ...``: paths (.Values.x), "strings", ints and _FUNCS."""

    def atom(word: str) -> Any:
        if word.startswith("."):
            v: Any = ctx
            for key in word[1:].split("."):
                if not isinstance(v, dict) or key not in v:
                    raise KeyError(f"{word}: no {key!r}")
                v = v[key]
            return v
        if word.startswith('"'):
            return json.loads(word)
        if word.isdigit():
            return int(word)
        raise ValueError(f"unsupported template word {word!r}")

    commands: list[list[str]] = [[]]
    for word in _WORD.findall(text):
        if word == "|":
            commands.append([])
        else:
            commands[-1].append(word)
    value: Any = None
    for i, (name, *args) in enumerate(commands):
        if name in _FUNCS:
            vals = [atom(a) for a in args] + ([value] if i else [])
            value = _FUNCS[name](*vals)
        elif i == 0 and not args:
            value = atom(name)
        else:
            raise ValueError(f"unsupported template command {' '.join([name, *args])!r}")
    return value


def _render(template: str, ctx: dict[str, Any]) -> str:
    """Renders ``{{ pipeline }}`` and ``{{ if }} / {{ else }} / {{ end }}`` with Go's ``{{-``/``-}}`` trims."""
    tokens: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        text = text.lstrip() if trim_next else text
        tokens.append(("text", text.rstrip() if m.group(1) else text))
        tokens.append(("action", m.group(2).strip()))
        pos, trim_next = m.end(), bool(m.group(3))
    tail = template[pos:]
    tokens.append(("text", tail.lstrip() if trim_next else tail))

    def block(it: Iterator[tuple[str, str]]) -> tuple[list[Any], str]:
        nodes: list[Any] = []
        for kind, body in it:
            if kind == "text":
                nodes.append(("text", body))
            elif body in {"end", "else"}:
                return nodes, body
            elif body.startswith("if "):
                then, closer = block(it)
                otherwise, closer = block(it) if closer == "else" else ([], closer)
                assert closer == "end", f"if {body!r} not closed"
                nodes.append(("if", body[3:], then, otherwise))
            elif re.match(r"(range|with|define|include|template|block|/\*)\b", body):
                raise ValueError(f"outside the renderer's subset: {{{{ {body} }}}}")
            else:
                nodes.append(("expr", body))
        return nodes, ""

    def emit(nodes: list[Any]) -> str:
        out = []
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "expr":
                out.append(_scalar(_pipeline(node[1], ctx)))
            else:
                out.append(emit(node[2] if _truthy(_pipeline(node[1], ctx)) else node[3]))
        return "".join(out)

    nodes, closer = block(iter(tokens))
    assert closer == "", f"unmatched {{{{ {closer} }}}}"
    return emit(nodes)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def render_chart(values: dict[str, Any] | None = None, release: str = "il") -> list[dict[str, Any]]:
    """The chart's manifests for ``values`` over values.yaml, as ``helm template`` would give them."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    ctx = {
        "Values": _merge(yaml.safe_load((CHART / "values.yaml").read_text()), values or {}),
        "Release": {"Name": release, "Namespace": "default", "Service": "Helm"},
        "Chart": {k[0].upper() + k[1:]: v for k, v in chart.items()},
    }
    docs = []
    for template in sorted((CHART / "templates").iterdir()):
        assert template.suffix == ".yaml", f"the renderer knows no {template.name}"
        docs += [d for d in yaml.safe_load_all(_render(template.read_text(), ctx)) if d is not None]
    return docs


VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "api key": {"auth": {"apiKey": "s3cret"}, "persistence": {"storageClassName": "fast"}},
    "existing secret": {
        "auth": {"existingSecret": "my-keys"},
        "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
    },
    "monitor": {"serviceMonitor": {"enabled": True}, "image": {"tag": "dev"}},
    "config": {
        "serverConfig": "workers = 8\nmin_retention = 0.75\n",
        "serviceMonitor": {"enabled": True, "authorization": {"secretName": "scrape", "key": "api-key"}},
    },
    # the front-end over a Milvus cluster (deploy/k8s/MILVUS.md): the proxy Service of release "vdb"
    "milvus": {
        "backend": "milvus",
        "milvus": {"uri": "http://vdb-milvus:19530"},
        "registry": "etcd://vdb-etcd:2379/interlingua",
        "image": {"tag": "0.1.0-milvus"},
    },
}


def _by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


@pytest.mark.parametrize("case", VALUE_SETS)
def test_chart_renders_valid_kubernetes_manifests(case: str) -> None:
    docs = render_chart(VALUE_SETS[case])
    kube_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]  # ">=1.27.0-0"
    floor = re.search(r"\d+\.\d+", kube_version).group()  # type: ignore[union-attr]
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked against the Service below
        for version in (floor, kubernetes_validate.utils.latest_version()):
            kubernetes_validate.validate(doc, version, strict=True)
    kinds = _by_kind(docs)
    assert len(kinds["StatefulSet"]) == 1 and len(kinds["Service"]) == 2
    secrets = sorted(s["metadata"]["name"] for s in kinds.get("Secret", []))
    assert secrets == {"api key": ["il-auth"], "config": ["il-config"]}.get(case, [])
    assert ("ServiceMonitor" in kinds) == (case in {"existing secret", "monitor", "config"})
    (sts,) = kinds["StatefulSet"]
    tag = VALUE_SETS[case].get("image", {}).get("tag") or _pyproject()["project"]["version"]
    assert sts["spec"]["template"]["spec"]["containers"][0]["image"] == f"interlingua:{tag}"


def test_chart_statefulset_keeps_data_probes_grpc_health_and_runs_as_the_image_user() -> None:
    docs = _by_kind(render_chart(VALUE_SETS["api key"]))
    (sts,) = docs["StatefulSet"]
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert set(env) <= set(ENV_VARS) | OTHER_ENV
    grpc_port = int(env["INTERLINGUA_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": grpc_port}, probe  # grpc.health.v1, overall status
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    (mount,) = container["volumeMounts"]
    assert mount == {"name": claim["metadata"]["name"], "mountPath": env["INTERLINGUA_DATA_DIR"]}
    assert claim["spec"]["storageClassName"] == "fast"
    *_, final = _stages(DEPLOY / "Dockerfile")
    assert env["INTERLINGUA_DATA_DIR"] == _env(final)["INTERLINGUA_DATA_DIR"]
    uid = int(re.search(r"ARG UID=(\d+)", (DEPLOY / "Dockerfile").read_text()).group(1))  # type: ignore[union-attr]
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == uid
    assert pod["securityContext"]["runAsNonRoot"] is True
    # the API key comes from the chart's Secret, never as a literal
    (secret,) = docs["Secret"]
    ref = env["INTERLINGUA_API_KEY"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert "s3cret" not in json.dumps(sts)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert (
        container["image"]
        == f"interlingua:{chart['appVersion']}"
        == f"interlingua:{_pyproject()['project']['version']}"
    )


def test_chart_existing_secret_and_service_monitor_select_the_api_service() -> None:
    docs = _by_kind(render_chart(VALUE_SETS["existing secret"]))
    (sts,) = docs["StatefulSet"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["INTERLINGUA_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "my-keys"
    (monitor,) = docs["ServiceMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "kps"
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in docs["Service"] if selector.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == ["il"]  # not the headless one: no double scrape
    (endpoint,) = monitor["spec"]["endpoints"]
    ports = {p["name"]: p for p in selected[0]["spec"]["ports"]}
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[endpoint["port"]]["targetPort"] == "metrics" and "metrics" in container_ports
    assert str(container_ports["metrics"]) == env["INTERLINGUA_METRICS_PORT"]["value"]
    headless = next(s for s in docs["Service"] if s["spec"].get("clusterIP") == "None")
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    for svc in docs["Service"]:
        assert svc["spec"]["selector"].items() <= pod_labels.items()


def test_renderer_follows_go_template_trims_and_refuses_the_unknown() -> None:
    ctx = {"Values": {"a": {"b": 1}, "m": {"x": "y"}, "s": ""}}
    assert (
        _render("k: {{ .Values.a.b | quote }}\n{{- if .Values.s }}\nno{{- else }}\nyes{{ end }}", ctx) == 'k: "1"\nyes'
    )
    assert _render("m:\n  {{- toYaml .Values.m | nindent 2 }}\n", ctx) == "m:\n  x: y\n"
    assert _render('{{ .Values.s | default "d" }}', ctx) == "d"
    assert _render('{{ if eq .Values.s "" }}e{{ else }}n{{ end }}{{ if eq .Values.a.b 2 }}!{{ end }}', ctx) == "e"
    with pytest.raises(KeyError):
        _render("{{ .Values.a.c }}", ctx)
    with pytest.raises(ValueError, match="subset"):
        _render("{{ range .Values.m }}{{ end }}", ctx)


# --- Grafana dashboard ------------------------------------------------------------------------

_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
_PROMQL_KEYWORDS |= {"offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric (series) names a PromQL expression selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)  # label matchers, ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    names = set()
    for m in re.finditer(r"[A-Za-z_:][\w:]*", expr):
        word, after = m.group(), expr[m.end() :].lstrip()
        if not after.startswith("(") and word.lower() not in _PROMQL_KEYWORDS:
            names.add(word)
    return names


def _exported(family: Metric) -> set[str]:
    """Series names a family exposes: counters end in _total, histograms in _bucket/_sum/_count."""
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "summary": ["", "_sum", "_count", "_created"],
        "info": ["_info"],
        "gaugehistogram": ["_bucket", "_gsum", "_gcount"],
    }.get(family.type, [""])
    return {family.name + s for s in suffixes}


def _dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target (rows' nested panels too) and template variable."""
    dash = json.loads((DEPLOY / "grafana" / "interlingua.json").read_text())
    out = []
    stack = list(dash["panels"])
    while stack:
        panel = stack.pop()
        stack += panel.get("panels", [])
        out += [(panel["title"], t["expr"]) for t in panel.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
        out.append((f"${var['name']}", m.group(1) if m else query))
    return out


def test_promql_metric_names() -> None:
    e = 'sum by (le, stage) (rate(x_bucket{collection=~"$collection", a="b"}[5m])) / on (a) y_count > bool 0'
    assert metric_names(e) == {"x_bucket", "y_count"}
    assert metric_names("interlingua_points") == {"interlingua_points"}


def test_dashboard_names_only_exported_metrics(tmp_path: Path) -> None:
    srv, _port = start_server(tmp_path / "data")
    try:
        exported = set().union(*(_exported(f) for f in srv.metrics.registry.collect()))
    finally:
        srv.stop(None)
    exprs = _dashboard_exprs()
    used = {name: where for where, expr in exprs for name in metric_names(expr)}
    unknown = {name: where for name, where in used.items() if name not in exported}
    assert not unknown, f"dashboard queries name metrics the service does not export: {unknown}"
    # the panels the compatibility features need
    for metric in ("interlingua_route_active", "interlingua_transform_retention", "interlingua_transform_ecc_margin"):
        assert metric in used, metric
    assert {"interlingua_shadow_agreement_sum", "interlingua_shadow_agreement_bucket"} <= set(used)


def test_dashboard_panels_are_well_formed() -> None:
    dash = json.loads((DEPLOY / "grafana" / "interlingua.json").read_text())
    datasource = yaml.safe_load((DEPLOY / "grafana" / "datasource.yaml").read_text())["datasources"][0]
    ids: set[int] = set()
    cells: set[tuple[int, int]] = set()
    for panel in dash["panels"]:
        assert panel["id"] not in ids
        ids.add(panel["id"])
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        cell = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cell & cells, f"{panel['title']} overlaps another panel"
        cells |= cell
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)) and (panel["type"] == "row" or refs)
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == datasource["uid"]


def test_chart_server_config_is_mounted_where_interlingua_config_points(tmp_path: Path) -> None:
    docs = _by_kind(render_chart(VALUE_SETS["config"]))
    (sts,) = docs["StatefulSet"]
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    path = Path(env["INTERLINGUA_CONFIG"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent))
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    (secret,) = [s for s in docs["Secret"] if s["metadata"]["name"] == volume["secret"]["secretName"]]
    # the file the pod sees is one `interlingua serve` reads
    (tmp_path / path.name).write_text(secret["stringData"][path.name])
    args = build_parser().parse_args(["serve"])
    config = build_server_config(args, {"INTERLINGUA_CONFIG": str(tmp_path / path.name)})
    assert config.workers == 8 and config.min_retention == 0.75
    (monitor,) = docs["ServiceMonitor"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": "scrape", "key": "api-key"}}


def test_chart_restarts_the_pod_when_the_config_changes_and_shows_no_key_hash() -> None:
    def annotations(values: dict[str, Any]) -> dict[str, str]:
        (sts,) = _by_kind(render_chart(values))["StatefulSet"]
        return dict(sts["spec"]["template"]["metadata"]["annotations"])

    assert annotations(VALUE_SETS["config"]) != annotations({}) == annotations({"image": {"tag": "x"}})
    key = VALUE_SETS["api key"]["auth"]["apiKey"]
    assert hashlib.sha256(key.encode()).hexdigest() not in json.dumps(annotations(VALUE_SETS["api key"]))


# --- the milvus backend on Kubernetes: the chart's values and deploy/k8s/MILVUS.md -------------

MILVUS_NOTES = DEPLOY / "k8s" / "MILVUS.md"


def _container_env(sts: dict[str, Any]) -> dict[str, str]:
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def test_chart_milvus_backend_sets_what_serve_reads_and_probes_liveness_over_tcp() -> None:
    (sts,) = _by_kind(render_chart(VALUE_SETS["milvus"]))["StatefulSet"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    env = _container_env(sts)
    assert set(env) <= set(ENV_VARS) | OTHER_ENV
    # what `interlingua serve` makes of the pod's environment: the same as --backend/--milvus-uri
    config = build_server_config(build_parser().parse_args(["serve"]), env)
    assert (config.backend, config.milvus_uri) == ("milvus", "http://vdb-milvus:19530")
    assert config.registry == "etcd://vdb-etcd:2379/interlingua"
    flags = build_parser().parse_args(
        ["serve", "--backend", "milvus", "--milvus-uri", "http://vdb-milvus:19530", "--registry", config.registry]
    )
    assert build_server_config(flags, {}).milvus_uri == config.milvus_uri
    assert build_server_config(flags, {}).registry == config.registry
    grpc_port = int(env["INTERLINGUA_PORT"])
    # NOT_SERVING while Milvus is unreachable: out of the Service (readiness), not restarted (liveness)
    assert container["livenessProbe"]["tcpSocket"] == {"port": grpc_port} and "grpc" not in container["livenessProbe"]
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"] == {"port": grpc_port}, probe
    assert sts["spec"]["replicas"] == 1  # one data volume per front-end: more front-ends are more releases
    # the defaults leave the server's own default (or serverConfig's `backend`) alone
    (plain,) = _by_kind(render_chart())["StatefulSet"]
    assert not {"INTERLINGUA_BACKEND", "INTERLINGUA_MILVUS_URI"} & set(_container_env(plain))
    (plain_container,) = plain["spec"]["template"]["spec"]["containers"]
    assert plain_container["livenessProbe"]["grpc"] == {"port": grpc_port}


def _shell_commands(markdown: str) -> list[list[str]]:
    """The commands of the ```sh blocks, continuation lines joined, comments dropped, split as sh."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def _set_values(words: list[str]) -> dict[str, Any]:
    """``--set a.b=c`` options as helm nests them (strings only: the notes set no numbers)."""
    values: dict[str, Any] = {}
    for flag, assignment in itertools.pairwise(words):
        if flag == "--set":
            key, _, value = assignment.partition("=")
            *path, last = key.split(".")
            node = values
            for part in path:
                node = node.setdefault(part, {})
            node[last] = value
    return values


def _keys(values: dict[str, Any], prefix: str = "") -> set[str]:
    out = set()
    for k, v in values.items():
        out |= _keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}"}
    return out


def test_milvus_notes_commands_match_the_chart_the_dockerfile_and_the_cli() -> None:
    notes = MILVUS_NOTES.read_text()
    commands = _shell_commands(notes)
    installs = [c for c in commands if c[:2] == ["helm", "install"] and c[3] == "deploy/helm/interlingua"]
    builds = [c for c in commands if c[:2] == ["docker", "build"]]
    assert installs and len(builds) == 1
    (build,) = builds
    assert build[build.index("-f") + 1] == "deploy/Dockerfile" and build[-1] == "."
    build_arg = build[build.index("--build-arg") + 1]
    assert build_arg == "EXTRAS=milvus"
    assert f"ARG {build_arg.split('=')[0]}=" in (DEPLOY / "Dockerfile").read_text()
    image = build[build.index("-t") + 1]
    chart_keys = _keys(yaml.safe_load((CHART / "values.yaml").read_text()))
    for words in installs:
        values = _set_values(words)
        assert _keys(values) <= chart_keys, _keys(values) - chart_keys  # no key the chart ignores
        docs = _by_kind(render_chart(values, release=words[2]))
        for doc in (d for ds in docs.values() for d in ds):
            kubernetes_validate.validate(doc, kubernetes_validate.utils.latest_version(), strict=True)
        (sts,) = docs["StatefulSet"]
        (container,) = sts["spec"]["template"]["spec"]["containers"]
        assert container["image"] == image  # the image the notes build
        config = build_server_config(build_parser().parse_args(["serve"]), _container_env(sts))
        assert config.backend == "milvus" and check_uri(config.milvus_uri) == config.milvus_uri
        # the notes' equivalent flags are real `serve` flags with the same effect
        flags = f"--backend milvus --milvus-uri {config.milvus_uri}"
        assert f"`{flags}`" in notes
        parsed = build_server_config(build_parser().parse_args(["serve", *flags.split()]), {})
        assert (parsed.backend, parsed.milvus_uri) == (config.backend, config.milvus_uri)
        # the Milvus release the notes install, its proxy Service (<release>-milvus) on 19530
        (milvus_install,) = [c for c in commands if c[:2] == ["helm", "install"] and c[3] == "zilliztech/milvus"]
        assert _set_values(milvus_install)["cluster"]["enabled"] == "true"
        assert config.milvus_uri == f"http://{milvus_install[2]}-milvus:19530"


def test_milvus_notes_network_policy_admits_the_front_ends_to_the_milvus_port() -> None:
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", MILVUS_NOTES.read_text(), re.S)]
    (policy,) = [b for b in blocks if isinstance(b, dict) and b.get("kind") == "NetworkPolicy"]
    kubernetes_validate.validate(policy, kubernetes_validate.utils.latest_version(), strict=True)
    uri = VALUE_SETS["milvus"]["milvus"]["uri"]
    (sts,) = _by_kind(render_chart(VALUE_SETS["milvus"]))["StatefulSet"]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    admitted = [
        rule
        for rule in policy["spec"]["ingress"]
        for peer in rule["from"]
        if peer["podSelector"]["matchLabels"].items() <= pod_labels.items()
    ]
    assert [[p["port"] for p in rule["ports"]] for rule in admitted] == [[int(uri.rsplit(":", 1)[1])]]
    # the proxy pods it guards belong to the release the URI names (<release>-milvus)
    selected = policy["spec"]["podSelector"]["matchLabels"]
    assert selected["component"] == "proxy" and f"{selected['app.kubernetes.io/instance']}-milvus" == _host(uri)
    # the replica settings shown are YAML the Milvus chart takes (user.yaml holds a Milvus config)
    (replicas,) = [b for b in blocks if isinstance(b, dict) and "extraConfigFiles" in b]
    user = yaml.safe_load(replicas["extraConfigFiles"]["user.yaml"])
    assert user["queryCoord"]["clusterLevelLoadReplicaNumber"] <= replicas["queryNode"]["replicas"]
