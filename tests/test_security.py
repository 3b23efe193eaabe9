"""Security (issue 10, item 9): keys with roles, TLS with client certificates, rate limits, /metrics auth.

Every test runs a real server over real gRPC. Certificates are made at test time by
``openssl`` (a throw-away CA, a server certificate for 127.0.0.1 and a client one).
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import connect, make_data, start_server, wait_for

from interlingua.client import Client, PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable
from interlingua.client._client import TLS
from interlingua.client._serve_config import ConfigError, build_server_config
from interlingua.server import Server
from interlingua.server.auth import METHODS, hash_key, required_role
from interlingua.server.config import ApiKey, RateLimit, TLSConfig
from interlingua.server.errors import (
    FailedPrecondition,
    NoRoute,
    RateLimited,
    status_for,
)
from interlingua.server.errors import (
    PermissionDenied as DomainPermissionDenied,
)
from interlingua.server.throttle import RateLimiter
from interlingua.v1 import collections_pb2 as cpb
from interlingua.v1 import points_pb2 as ppb
from interlingua.v1 import spaces_pb2 as spb

D = 8
KEYS = (
    ApiKey("reader", hash_key("read-key"), "read"),
    ApiKey("writer", hash_key("write-key"), "write"),
    ApiKey("boss", hash_key("admin-key"), "admin"),
    ApiKey("slow", hash_key("slow-key"), "read", rate_per_second=0.5),
    ApiKey("slow-writer", hash_key("slow-write-key"), "write", rate_per_second=0.5),
)


def md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[Server, int]]:
    srv, port = start_server(tmp_path / "d", keys=KEYS, api_key="legacy", metrics_port=0, metrics_auth=True)
    with Client(f"127.0.0.1:{port}", api_key="admin-key") as admin:
        admin.register_space("old@1", D)
        admin.create_collection("gallery", "old@1")
        admin.upsert("gallery", [f"p{i}" for i in range(10)], make_data(10, D), space="old@1")
    yield srv, port
    srv.stop(None)


# -- roles ---------------------------------------------------------------------------------------


def test_every_method_has_a_role() -> None:
    roles = {m.rsplit("/", 1)[-1]: required_role(m) for m in METHODS}
    assert {n for n, r in roles.items() if r == "write"} == {"Upsert", "UpsertStream", "DeletePoints"}
    assert roles["Search"] == roles["GetPoints"] == roles["ListCollections"] == "read"
    assert roles["CreateCollection"] == roles["RegisterSpace"] == roles["FitTransform"] == "admin"
    assert roles["CreateSnapshot"] == roles["DownloadSnapshot"] == roles["RestoreSnapshot"] == "admin"
    assert required_role("/interlingua.v1.PointService/SomethingNew") == "admin"  # unknown: the safest


def test_missing_or_unknown_key_is_unauthenticated(secured: tuple[Server, int]) -> None:
    _, port = secured
    for key in (None, "nope"):
        with Client(f"127.0.0.1:{port}", api_key=key) as c, pytest.raises(Unauthenticated) as exc:
            c.list_collections()
        assert ("missing" if key is None else "wrong") in exc.value.message
    s = connect(port)
    with pytest.raises(grpc.RpcError) as err:
        list(s.points.SearchStream(iter([ppb.SearchRequest()])))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    s.channel.close()


def test_roles_allow_and_deny(secured: tuple[Server, int]) -> None:
    _, port = secured
    x = make_data(2, D, seed=5)
    target = f"127.0.0.1:{port}"
    with Client(target, api_key="read-key") as r, Client(target, api_key="write-key") as w:
        before = r.get_collection("gallery")
        assert r.search("gallery", x, k=3, space="old@1").ids.shape == (2, 3)
        with pytest.raises(PermissionDenied, match="'reader' has role 'read'; Upsert needs 'write'"):
            r.upsert("gallery", ["n0", "n1"], x, space="old@1")
        with pytest.raises(PermissionDenied, match="needs 'admin'"):
            r.create_collection("other", "old@1")
        with pytest.raises(PermissionDenied, match="needs 'admin'"):
            w.register_space("new@2", D)
        with pytest.raises(PermissionDenied, match="needs 'admin'"):
            w.delete_collection("gallery")
        after = r.get_collection("gallery")
        assert (after.num_points, after.last_sequence) == (before.num_points, before.last_sequence)
        w.upsert("gallery", ["n0", "n1"], x, space="old@1")
        assert w.delete("gallery", ["n0"]) == 1
    s = connect(port)
    with pytest.raises(grpc.RpcError) as err:  # a denied stream, before any message is read
        s.points.UpsertStream(iter([ppb.UpsertRequest(collection="gallery")]), metadata=md("read-key"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    s.channel.close()
    for key in ("admin-key", "legacy"):  # the old single api_key is an admin key
        with Client(target, api_key=key) as a:
            a.create_collection(f"c-{key}", "old@1")
            a.delete_collection(f"c-{key}")


def test_error_table_most_specific_wins() -> None:
    class Sub(DomainPermissionDenied):
        pass

    assert status_for(NoRoute("x")) is grpc.StatusCode.FAILED_PRECONDITION
    assert status_for(FailedPrecondition("x")) is grpc.StatusCode.FAILED_PRECONDITION
    assert status_for(RateLimited("x", 1.0)) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_for(Sub("x")) is grpc.StatusCode.PERMISSION_DENIED


def test_api_key_config_is_checked() -> None:
    with pytest.raises(ValueError, match="64 lowercase hex"):
        ApiKey("k", "abc", "read")
    with pytest.raises(ValueError, match="role must be one of read, write, admin"):
        ApiKey("k", hash_key("x"), "root")


# -- rate limit ----------------------------------------------------------------------------------


def test_token_bucket_refills() -> None:
    now = [0.0]
    bucket = RateLimiter(RateLimit(per_second=2.0, burst=3), clock=lambda: now[0])
    for _ in range(3):
        bucket.take("k")
    with pytest.raises(RateLimited) as exc:
        bucket.take("k")
    assert exc.value.retry_after == pytest.approx(0.5)
    bucket.take("other")  # buckets are per key
    now[0] = 0.5
    bucket.take("k")
    RateLimiter(RateLimit()).take("k")  # 0: unlimited


def test_rate_limited_key_gets_retry_after(secured: tuple[Server, int]) -> None:
    _, port = secured
    with (
        Client(f"127.0.0.1:{port}", api_key="slow-key") as slow,
        Client(f"127.0.0.1:{port}", api_key="read-key") as other,
    ):
        slow.list_spaces()
        with pytest.raises(ResourceExhausted, match="over its rate limit") as exc:
            slow.list_spaces()
        assert exc.value.retry_after is not None and 0 < exc.value.retry_after <= 2.0
        other.list_spaces()  # other keys are not limited by it
    s = connect(port)
    with pytest.raises(grpc.RpcError) as err:
        s.spaces.ListSpaces(spb.ListSpacesRequest(), metadata=md("slow-key"))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(err.value.trailing_metadata() or ())["retry-after"]
    s.channel.close()


def test_each_stream_message_is_charged_to_the_rate_limit(secured: tuple[Server, int]) -> None:
    """A SearchStream or UpsertStream is no way around a key's rate limit: each message after the
    first (the call took a token) is charged as one call; over it the stream ends RESOURCE_EXHAUSTED
    with retry-after, and what came before stands."""
    _, port = secured
    xq = make_data(3, D, seed=11)
    with Client(f"127.0.0.1:{port}", api_key="slow-key") as slow, slow.search_stream() as stream:
        first = stream.search("gallery", xq[0], 3, space="old@1")  # the call's own token
        assert first.ids.shape == (1, 3)
        with pytest.raises(ResourceExhausted, match="each SearchStream message counts as one call") as exc:
            stream.search("gallery", xq[1], 3, space="old@1")
        assert exc.value.retry_after is not None and 0 < exc.value.retry_after <= 2.0
    with Client(f"127.0.0.1:{port}", api_key="admin-key") as admin:
        before = admin.get_collection("gallery").num_points
    with Client(f"127.0.0.1:{port}", api_key="slow-write-key") as writer:
        x = make_data(3, D, seed=12)
        with pytest.raises(
            ResourceExhausted, match=r"stream message 1: .*UpsertStream message.*0\.\.0, 1 vectors"
        ) as up:
            writer.upsert_stream("gallery", ["m0", "m1", "m2"], x, space="old@1", batch_size=1)
        assert up.value.retry_after is not None
    with Client(f"127.0.0.1:{port}", api_key="admin-key") as admin:
        assert admin.get_collection("gallery").num_points == before + 1  # message 0 committed, 1 and 2 not
        assert admin.get("gallery", ["m0"])[0].id == "m0"
        with admin.search_stream() as stream:  # an unlimited key: every message passes, as unary calls answer
            for i in range(20):
                got = stream.search("gallery", xq[i % 3], 3, space="old@1")
                want = admin.search("gallery", xq[i % 3], 3, space="old@1")
                assert got.ids.tolist() == want.ids.tolist()


# -- /metrics behind auth ------------------------------------------------------------------------


def _get_metrics(port: int, key: str | None) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            assert b"grpc_server_handled_total" in r.read()
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_metrics_behind_auth(secured: tuple[Server, int]) -> None:
    srv, _ = secured
    assert srv.metrics_port
    assert _get_metrics(srv.metrics_port, None) == 401
    assert _get_metrics(srv.metrics_port, "nope") == 401
    assert _get_metrics(srv.metrics_port, "read-key") == 200


def test_metrics_auth_needs_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="metrics_auth needs API keys"):
        start_server(tmp_path / "d", metrics_auth=True)


# -- TLS -----------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)  # fmt: skip
    for name, usage, san in (("server", "serverAuth", "IP:127.0.0.1,DNS:localhost"), ("client", "clientAuth", "")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        ext = f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n" + (f"subjectAltName={san}\n" if san else "")
        (d / f"{name}.ext").write_text(ext)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
    return d


def test_tls_server_and_client(tmp_path: Path, certs: Path) -> None:
    tls = TLSConfig(cert=certs / "server.pem", key=certs / "server.key")
    srv, port = start_server(tmp_path / "d", tls=tls)
    target = f"127.0.0.1:{port}"
    try:
        with Client(target, tls=TLS(ca=certs / "ca.pem")) as c:
            c.register_space("old@1", D)
            assert [s.name for s in c.list_spaces()] == ["old@1"]
            assert c.health() == "SERVING"
        with Client(target, timeout=2) as plain, pytest.raises(Unavailable):
            plain.list_spaces()  # a plain-text client cannot talk to a TLS server
    finally:
        srv.stop(None)


def test_mutual_tls_requires_a_client_certificate(tmp_path: Path, certs: Path) -> None:
    tls = TLSConfig(cert=certs / "server.pem", key=certs / "server.key", client_ca=certs / "ca.pem")
    srv, port = start_server(tmp_path / "d", tls=tls, api_key="k")
    target = f"127.0.0.1:{port}"
    try:
        mutual = TLS(ca=certs / "ca.pem", cert=certs / "client.pem", key=certs / "client.key")
        with Client(target, api_key="k", tls=mutual) as c:
            assert c.list_spaces() == []
        with Client(target, api_key="k", timeout=2, tls=TLS(ca=certs / "ca.pem")) as c, pytest.raises(Unavailable):
            c.list_spaces()
    finally:
        srv.stop(None)


def test_unreadable_server_tls_files_are_a_clear_error(tmp_path: Path) -> None:
    from interlingua.server.errors import InvalidArgument

    tls = TLSConfig(cert=tmp_path / "missing.pem", key=tmp_path / "missing.key")
    with pytest.raises(InvalidArgument, match=r"tls: cannot read .*missing\.key: No such file"):
        start_server(tmp_path / "d", tls=tls)


def test_client_tls_config_is_checked(tmp_path: Path) -> None:
    from interlingua.client import InvalidArgument

    with pytest.raises(InvalidArgument, match="both cert and key"):
        TLS(cert=tmp_path / "c.pem")
    with pytest.raises(InvalidArgument, match="cannot read"):
        Client("127.0.0.1:1", tls=TLS(ca=tmp_path / "missing.pem"))


# -- configuration -------------------------------------------------------------------------------


def _args(**kw: Any) -> SimpleNamespace:
    names = ("config", "data_dir", "host", "port", "metrics_port", "api_key", "workers", "omp_threads", "device")
    values: dict[str, Any] = {n: None for n in names} | {"no_metrics": False, "metrics_auth": False}
    return SimpleNamespace(**(values | kw))


def test_security_config_from_toml_env_and_flags(tmp_path: Path) -> None:
    toml = tmp_path / "server.toml"
    toml.write_text(
        'metrics_auth = true\n[tls]\ncert = "s.pem"\nkey = "s.key"\n[rate_limit]\nper_second = 5.0\nburst = 10\n'
        f'[[keys]]\nname = "ro"\nsha256 = "{hash_key("a")}"\nrole = "read"\n'
        f'[[keys]]\nname = "rw"\nsha256 = "{hash_key("b")}"\nrole = "write"\nrate_per_second = 50\n'
    )
    cfg = build_server_config(_args(config=str(toml)), environ={})
    assert cfg.tls == TLSConfig(cert=Path("s.pem"), key=Path("s.key"))
    assert cfg.rate_limit == RateLimit(per_second=5.0, burst=10) and cfg.metrics_auth
    assert [(k.name, k.role, k.rate_per_second) for k in cfg.keys] == [("ro", "read", None), ("rw", "write", 50.0)]
    env = {"INTERLINGUA_TLS_CLIENT_CA": "ca.pem", "INTERLINGUA_RATE_LIMIT": "7"}
    cfg = build_server_config(_args(config=str(toml), tls_cert="f.pem", tls_key=None, tls_client_ca=None), env)
    assert cfg.tls == TLSConfig(cert=Path("f.pem"), key=Path("s.key"), client_ca=Path("ca.pem"))
    assert cfg.rate_limit.per_second == 7.0


@pytest.mark.parametrize(
    "text,match",
    [
        ('[[keys]]\nname = "x"\nsha256 = "abc"\n', "64 lowercase hex"),
        (f'[[keys]]\nname = "x"\nsha256 = "{"0" * 64}"\nrole = "root"\n', "role must be one of"),
        ('[[keys]]\nname = "x"\n', "missing sha256"),
        (f'[[keys]]\nname = "x"\nsha256 = "{"0" * 64}"\ncolour = 1\n', "unknown key"),
        ('[tls]\ncert = "a.pem"\n', "both cert and key"),
        ("[rate_limit]\nper_second = true\n", "per_second must be float"),
        ("metrics_auth = true\n", "metrics_auth needs API keys"),
    ],
)
def test_bad_security_config_is_a_config_error(tmp_path: Path, text: str, match: str) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError, match=match):
        build_server_config(_args(config=str(toml)), environ={})


def test_denied_calls_change_nothing(secured: tuple[Server, int]) -> None:
    """A denied write leaves the stored vectors as they were."""
    _, port = secured
    with Client(f"127.0.0.1:{port}", api_key="read-key") as r:
        before = r.get("gallery", ["p0"], with_vectors=True)[0]
        with pytest.raises(PermissionDenied):
            r.upsert("gallery", ["p0"], np.ones((1, D), np.float32), space="old@1")
        after = r.get("gallery", ["p0"], with_vectors=True)[0]
        assert before.sequence == after.sequence
        assert before.vectors["old@1"].tobytes() == after.vectors["old@1"].tobytes()
    s = connect(port)
    with pytest.raises(grpc.RpcError) as err:
        s.collections.DeleteCollection(cpb.DeleteCollectionRequest(name="gallery"), metadata=md("write-key"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    s.channel.close()


def test_readme_toml_example_is_a_valid_config(tmp_path: Path) -> None:
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```toml\n(.*?)```", readme, re.S)
    assert block is not None
    toml = tmp_path / "readme.toml"
    toml.write_text(block.group(1).replace("<printf %s KEY | sha256sum>", hash_key("k")))
    cfg = build_server_config(_args(config=str(toml)), environ={})
    assert cfg.tls is not None and cfg.tls.client_ca == Path("ca.pem")
    assert [(k.name, k.role) for k in cfg.keys] == [("frontend", "read")] and cfg.rate_limit.burst == 100


def test_stream_caps_are_per_key(tmp_path: Path) -> None:
    """An authenticated caller's streams count against its key, not its address."""
    import queue

    from interlingua.server import Limits

    limits = Limits(max_streams=8, max_streams_per_client=2)
    srv, port = start_server(tmp_path / "d", keys=KEYS, limits=limits)
    s = connect(port)
    ends: list[queue.Queue[object]] = []
    calls: list[Any] = []

    def idle_stream(key: str) -> Any:
        q: queue.Queue[object] = queue.Queue()
        ends.append(q)
        call = s.points.SearchStream(iter(q.get, None), metadata=md(key), timeout=60)
        calls.append(call)
        return call

    try:
        for _ in range(2):
            idle_stream("read-key")
        wait_for(lambda: srv.slots.open == 2)
        with pytest.raises(grpc.RpcError) as err:
            next(idle_stream("read-key"))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "per client" in (err.value.details() or "")
        idle_stream("write-key")  # another key from the same address still gets a slot
        wait_for(lambda: srv.slots.open == 3)
    finally:
        for q in ends:
            q.put(None)
        for c in calls:
            c.cancel()
        s.channel.close()
        srv.stop(None)
