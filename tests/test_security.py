"""Tenants decided by the kernel: other uids see and touch only what their namespaces allow."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import save, save_file

import trims
from trims.acl import AccessPolicy

from .conftest import ROOT, DaemonProcess

pytestmark = pytest.mark.skipif(os.getuid() != 0 or not shutil.which("setpriv"),
                                reason="needs root and setpriv to run clients under other uids")

TEAM_A, TEAM_B_MEMBER, TEAM_B_GROUP, STRANGER = 23001, 23002, 23102, 23003

OPERATORS = """
socket_mode = "0666"
frame_timeout = 2

[tenants.operators]
uids = [0]
namespaces = ["*"]
admin = true
"""

CONFIG = OPERATORS + f"""
[tenants.team-a]
uids = [{TEAM_A}]
namespaces = ["team-a/*", "public/*"]
push = ["team-a/*"]
max_leased_bytes = "600K"
max_pushed_bytes = "300K"

[tenants.team-b]
gids = [{TEAM_B_GROUP}]
namespaces = ["team-b/*"]
"""

# Runs in a child under another uid; prints what each attempt did.
PROBE = """
import json, sys, trims
results = {}
def attempt(label, call):
    try:
        value = call()
        results[label] = ["ok", value]
    except trims.TrimsError as exc:
        results[label] = [type(exc).__name__, str(exc)]
try:
    client = trims.connect()
except trims.TrimsError as exc:
    print(json.dumps({"connect": [type(exc).__name__, str(exc)]})); sys.exit(0)
"""


@contextlib.contextmanager
def daemon_for_other_uids(config: str, **options) -> Iterator[tuple[DaemonProcess, Path]]:
    """A daemon with ``config``, its socket in a world-searchable directory outside pytest's
    0700 tmp, so that other uids can reach it; and that directory."""
    workdir = Path(tempfile.mkdtemp(prefix="trims-sec-", dir="/tmp"))
    os.chmod(workdir, 0o755)
    (workdir / "trims.toml").write_text(config)
    daemon = DaemonProcess(workdir, extra=("--config", str(workdir / "trims.toml")), **options).start()
    try:
        yield daemon, workdir
    finally:
        daemon.kill()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def secured():
    with daemon_for_other_uids(CONFIG, host_memory="4M") as (daemon, workdir):
        yield daemon, _other_readable_models(daemon, workdir / "models")


def _other_readable_models(daemon: DaemonProcess, models: Path) -> Path:
    """Models pushed under four namespaces, and files any uid may read for its own pushes."""
    models.mkdir()
    client = daemon.client()
    for name, seed in (("team-a/m", 0), ("team-b/m", 1), ("public/m", 2), ("private/m", 3)):
        save_file({"w": torch.randn(32 * 1024, generator=torch.Generator().manual_seed(seed))}, models / f"{seed}.safetensors")
        client.push(models / f"{seed}.safetensors", name)
    for seed in (10, 11):
        save_file({"w": torch.randn(64 * 1024, generator=torch.Generator().manual_seed(seed))}, models / f"{seed}.safetensors")
    os.chmod(models, 0o755)
    for path in models.iterdir():
        os.chmod(path, 0o644)
    return models


def probe(daemon: DaemonProcess, uid: int, body: str, groups: tuple[int, ...] = ()) -> dict:
    """Run ``PROBE + body`` as ``uid``; return what it printed."""
    command = ["setpriv", "--reuid", str(uid), "--regid", str(uid)]
    command += ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    env = {**daemon.env, "PYTHONPATH": str(ROOT / "src"), "HOME": "/tmp"}
    code = PROBE + textwrap.dedent(body) + "\nprint(json.dumps(results))\n"
    done = subprocess.run([*command, sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_trims_stats_shows_a_tenant_its_own_usage(secured):
    daemon, _ = secured
    seen = probe(daemon, TEAM_A, """
        import contextlib, io
        from trims.cli import main
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = main(["stats"])
        attempt("cli", lambda: [code, printed.getvalue()])
    """)
    code, out = seen["cli"][1]
    assert code == 0
    assert out.splitlines() == ["tenant team-a: 2 models it may open", "leases 0 on 0 B of 600.0 KiB",
                                "pushed 0 B of 300.0 KiB"]


def test_a_file_the_client_cannot_read_is_a_typed_error(secured):
    daemon, models = secured
    os.chmod(models / "11.safetensors", 0o600)
    try:
        seen = probe(daemon, TEAM_A, f"""
            attempt("push", lambda: client.push({str(models / "11.safetensors")!r}, "team-a/x"))
        """)
    finally:
        os.chmod(models / "11.safetensors", 0o644)
    assert seen["push"][0] == "InvalidModel" and "Permission denied" in seen["push"][1]


def test_a_tenant_sees_and_opens_only_its_namespaces(secured):
    daemon, _ = secured
    seen = probe(daemon, TEAM_A, """
        attempt("ls", lambda: sorted(m.name for m in client.list()))
        attempt("open own", lambda: client.open("team-a/m")["w"].shape)
        attempt("open public", lambda: client.open("public/m")["w"].shape)
        attempt("open other", lambda: client.open("team-b/m"))
        attempt("open missing", lambda: client.open("team-b/nothing-here"))
        attempt("info other", lambda: client.info("team-b/m"))
        attempt("by digest", lambda: client.open(sys.argv[1] if len(sys.argv) > 1 else "x"))
        attempt("stats", lambda: sorted(client.stats()))
    """)
    assert seen["ls"] == ["ok", ["public/m:latest", "team-a/m:latest"]]
    assert seen["open own"] == ["ok", [32768]] and seen["open public"] == ["ok", [32768]]
    # another tenant's model is indistinguishable from one that does not exist
    assert seen["open other"][0] == "ModelNotFound" and seen["info other"][0] == "ModelNotFound"
    assert seen["open other"][1].replace("team-b/m", "X") == seen["open missing"][1].replace("team-b/nothing-here", "X")
    assert seen["stats"] == ["ok", ["leased_bytes", "leases", "max_leased_bytes", "max_pushed_bytes", "models",
                                   "pushed_bytes", "tenant"]]


def test_a_digest_does_not_open_a_model_the_tenant_cannot_see(secured):
    daemon, _ = secured
    hidden = daemon.client().info("team-b/m").digest
    seen = probe(daemon, TEAM_A, f"""
        attempt("digest", lambda: client.open({hidden!r}))
    """)
    assert seen["digest"][0] == "ModelNotFound"


def test_roles_bound_what_a_tenant_may_change(secured):
    daemon, models = secured
    seen = probe(daemon, TEAM_A, f"""
        attempt("push own", lambda: client.push({str(models / "10.safetensors")!r}, "team-a/new").name)
        attempt("push other", lambda: client.push({str(models / "10.safetensors")!r}, "team-b/new"))
        attempt("evict", lambda: client.evict("team-a/m"))
        attempt("pin", lambda: client.pin("team-a/m"))
        attempt("rm other", lambda: client.remove("team-b/m"))
        attempt("push public", lambda: client.push({str(models / "10.safetensors")!r}, "public/overwritten"))
        attempt("rm public", lambda: client.remove("public/m"))
    """)
    assert seen["push own"] == ["ok", "team-a/new:latest"]
    assert seen["push other"][0] == "PermissionDenied"
    assert seen["evict"][0] == "PermissionDenied" and seen["pin"][0] == "PermissionDenied"
    assert seen["rm other"][0] == "ModelNotFound"
    assert seen["push public"][0] == "PermissionDenied" and seen["rm public"][0] == "PermissionDenied"
    assert {m.name for m in daemon.client().list()} >= {"team-b/m:latest", "team-a/new:latest"}
    daemon.client().remove("team-a/new")


def test_a_group_member_is_its_groups_tenant_and_read_only(secured):
    daemon, models = secured
    seen = probe(daemon, TEAM_B_MEMBER, f"""
        attempt("ls", lambda: [m.name for m in client.list()])
        attempt("push", lambda: client.push({str(models / "10.safetensors")!r}, "team-b/new"))
    """, groups=(TEAM_B_GROUP,))
    assert seen["ls"] == ["ok", ["team-b/m:latest"]]
    assert seen["push"][0] == "PermissionDenied"


def test_a_uid_that_is_no_tenant_is_refused(secured):
    daemon, _ = secured
    seen = probe(daemon, STRANGER, "")
    assert seen["connect"][0] == "PermissionDenied" and "not a tenant" in seen["connect"][1]
    daemon.client().ping()


def test_quotas_on_leased_and_pushed_bytes(secured):
    daemon, models = secured
    seen = probe(daemon, TEAM_A, f"""
        held = []
        attempt("open 1", lambda: held.append(client.open("team-a/m")))
        attempt("open 2", lambda: held.append(client.open("public/m")))
        attempt("open 3", lambda: held.append(client.open("public/m")))
        attempt("open 4", lambda: held.append(client.open("public/m")))
        attempt("open 5", lambda: held.append(client.open("team-a/m")))
        attempt("usage", lambda: client.stats()["leased_bytes"])
        attempt("push 1", lambda: client.push({str(models / "10.safetensors")!r}, "team-a/q1").name)
        attempt("push 2", lambda: client.push({str(models / "11.safetensors")!r}, "team-a/q2").name)
    """)
    # 128 KiB a model, 600 KiB allowed: two models, however often open, are 256 KiB (a fifth
    # model would be one too many: test_concurrent_opens_cannot_race_past_a_quota)
    assert [seen[f"open {i}"][0] for i in range(1, 6)] == ["ok"] * 5
    assert seen["usage"] == ["ok", 2 * 128 * 1024]
    assert seen["push 1"] == ["ok", "team-a/q1:latest"]  # 256 KiB of its own (what root pushed is root's)
    assert seen["push 2"][0] == "QuotaExceeded" and "max_pushed_bytes" in seen["push 2"][1]
    assert trims.connect(daemon.socket).stats()["leases"] == 0  # its leases ended with its process
    daemon.client().remove("team-a/q1")


def test_transparent_registrations_stay_with_their_tenant(secured):
    daemon, models = secured
    seen = probe(daemon, TEAM_A, f"""
        attempt("adopt", lambda: client.adopt({str(models / "10.safetensors")!r}).name)
    """)
    assert seen["adopt"][0] == "ok" and seen["adopt"][1].startswith("auto/team-a/")
    seen_b = probe(daemon, TEAM_B_MEMBER, f"""
        attempt("ls", lambda: [m.name for m in client.list()])
        attempt("open", lambda: client.open({seen["adopt"][1]!r}))
    """, groups=(TEAM_B_GROUP,))
    assert seen_b["ls"] == ["ok", ["team-b/m:latest"]] and seen_b["open"][0] == "ModelNotFound"
    daemon.client().remove(seen["adopt"][1])


def test_a_descriptor_not_open_for_reading_is_refused(secured):
    from trims import protocol, transport

    daemon, models = secured
    fd = os.open(models / "10.safetensors", os.O_PATH)
    channel = transport.connect(daemon.socket)
    try:
        channel.send(protocol.Adopt(id=1, files=("m.safetensors",), fds=(fd,)))
        reply = channel.receive()
        assert isinstance(reply, protocol.Error) and "not open for reading" in reply.message
    finally:
        channel.close()
        os.close(fd)


def test_other_names_for_a_model_are_shown_only_if_visible(secured):
    daemon, models = secured
    client = daemon.client()
    client.push(models / "10.safetensors", "public/shared")
    client.push(models / "10.safetensors", "private/acquisition-target")
    try:
        seen = probe(daemon, TEAM_A, """
            attempt("aliases", lambda: list(client.info("public/shared").aliases))
        """)
        assert seen["aliases"] == ["ok", []]
        assert "private/acquisition-target:latest" in client.info("public/shared").aliases
    finally:
        client.remove("public/shared")
        client.remove("private/acquisition-target")


def test_concurrent_opens_cannot_race_past_a_quota(secured):
    daemon, models = secured
    client = daemon.client()
    names = [f"public/q{i}" for i in range(8)]
    for i, name in enumerate(names):
        save_file({"w": torch.randn(32 * 1024, generator=torch.Generator().manual_seed(100 + i))}, models / "q.safetensors")
        client.push(models / "q.safetensors", name)
    try:
        seen = probe(daemon, TEAM_A, f"""
            import threading
            opened, refused, clients = [], [], [trims.connect() for _ in range(8)]
            def one(c, name):
                try:
                    opened.append(c.open(name))
                except trims.QuotaExceeded:
                    refused.append(1)
            threads = [threading.Thread(target=one, args=pair) for pair in zip(clients, {names!r})]
            [t.start() for t in threads]
            [t.join() for t in threads]
            attempt("counts", lambda: [len(opened), len(refused)])
        """)
    finally:
        for name in names:
            client.remove(name)
    assert seen["counts"] == ["ok", [4, 4]]  # 128 KiB each, 600 KiB allowed: never a fifth


def test_leases_on_one_model_count_once_against_the_quota(secured):
    """The quota bounds the memory a tenant's open models hold: a model open twice, or under
    two names, is the same memory."""
    daemon, models = secured
    client = daemon.client()
    client.push(models / "2.safetensors", "public/m-again")  # public/m's bytes
    try:
        seen = probe(daemon, TEAM_A, """
            views = [client.open(name) for name in ("public/m", "public/m-again", "public/m", "public/m")]
            attempt("usage", lambda: [client.stats()["leases"], client.stats()["leased_bytes"]])
        """)
    finally:
        client.remove("public/m-again")
    assert seen["usage"] == ["ok", [4, 128 * 1024]]


def test_push_rights_are_their_own_namespaces(tmp_path):
    from trims.acl import parse_tenants
    from trims.config import parse_size
    from trims.errors import ConfigError

    policy = parse_tenants({"a": {"uids": [1], "namespaces": ["team-a/*", "public/*"], "push": ["team-a/*"]}}, parse_size)
    (tenant,) = policy.tenants
    assert tenant.can_push("team-a/x") and tenant.can_see("public/x") and not tenant.can_push("public/x")
    assert tenant.can_push("auto/a/0123") and not tenant.can_see("auto/b/0123")
    # Another tenant's transparent-mode registrations stay its own, whatever the patterns say
    (wide,) = parse_tenants({"w": {"uids": [2], "namespaces": ["*", "auto/*"], "push": ["*"]}}, parse_size).tenants
    assert wide.can_see("auto/w/0123") and wide.can_see("team-a/x")
    assert not wide.can_see("auto/a/0123") and not wide.can_push("auto/a/0123")
    (admin,) = parse_tenants({"ops": {"uids": [3], "admin": True}}, parse_size).tenants
    assert admin.can_see("auto/a/0123")
    (anyone,) = parse_tenants({"any": {"gids": ["*"], "namespaces": ["public/*"]}}, parse_size).tenants
    assert anyone.matches(12345, [54321])  # "*" means any in gids as in uids
    (capped,) = parse_tenants({"c": {"uids": [4], "max_connections": 8}}, parse_size).tenants
    assert capped.max_connections == 8 and admin.max_connections is None
    for bad in ({"admin": "no"}, {"push": "yes"}, {"max_leased_bytes": -1}, {"uids": "0"}, {"uids": [-1]},
                {"max_connections": 0}, {"max_connections": "8"}, {"max_connections": True},
                {"namespaces": ["bad name/*"]}, {"push": ["team a/*"]}, {"namespaces": [""]}):
        with pytest.raises(ConfigError):
            parse_tenants({"a": {"namespaces": ["*"], **bad}}, parse_size)
    with pytest.raises(ConfigError, match=r"\[tenants\] names no tenant"):
        parse_tenants({}, parse_size)


def test_bucket_patterns_name_their_bucket_and_bound_what_the_daemon_reaches():
    from trims.acl import parse_tenants
    from trims.config import parse_size
    from trims.errors import ConfigError

    spec = {"uids": [1], "namespaces": ["a/*"], "push": True, "buckets": ["s3://models-a/team/*", "gs://shared/x.safetensors"]}
    (tenant,) = parse_tenants({"a": spec}, parse_size).tenants
    assert tenant.may_reach("s3://models-a/team/m/model.safetensors") and tenant.may_reach("gs://shared/x.safetensors")
    for url in ("s3://models-a/other/m", "s3://models-ab/team/m", "s3://models-a/team/../../models-b/m",
                "s3://models-a/team/./m", "gs://shared/y.safetensors", "s3://models-a/team/.\t./../models-b/m",
                "s3://models-a/team/%2e%2e/%2e%2e/models-b/m", "s3://models-a/team/m?versionId=1", "s3://models-a/team/m#x",
                "s3://models-a/team/m::s3://models-b/m", "s3://models-a/team/m\\..\\..", "s3://models-a/team/m\n"):
        assert not tenant.may_reach(url), url
    (pushless,) = parse_tenants({"b": {"uids": [2], "namespaces": ["b/*"], "push": True}}, parse_size).tenants
    assert not pushless.may_reach("s3://models-a/team/m")  # no buckets configured: none
    assert AccessPolicy.single_user().tenants[0].may_reach("s3://anything/at/all")
    for bad in ("models-a/*", "s3://models-*/x", "s3://", "s3:///x", "file://x/*", "https://x/*", ["s3://ok/*", 3]):
        with pytest.raises(ConfigError):
            parse_tenants({"a": {**spec, "buckets": bad if isinstance(bad, list) else [bad]}}, parse_size)


def test_a_tenant_has_the_daemon_reach_only_the_buckets_its_config_allows(s3):
    allowed, other = s3.new_bucket(), s3.new_bucket()
    data = save({"w": torch.arange(1024.0)})
    for bucket in (allowed, other):
        s3.client().put_object(Bucket=bucket, Key="models/m.safetensors", Body=data)
    config = OPERATORS + f"""
[tenants.team-a]
uids = [{TEAM_A}]
namespaces = ["team-a/*"]
push = true
buckets = ["s3://{allowed}/models/*"]
"""
    with daemon_for_other_uids(config) as (daemon, _):
        results = probe(daemon, TEAM_A, f"""
attempt("allowed", lambda: client.push("s3://{allowed}/models/m.safetensors", "team-a/m").nbytes)
attempt("another bucket", lambda: client.push("s3://{other}/models/m.safetensors", "team-a/o").nbytes)
attempt("a way out", lambda: client.push("s3://{allowed}/models/../models/m.safetensors", "team-a/d").nbytes)
attempt("escaped", lambda: client.push("s3://{allowed}/models/%2e%2e/models/m.safetensors", "team-a/d").nbytes)
attempt("upload elsewhere", lambda: client.push("s3://{allowed}/models/m.safetensors", "team-a/m", to="s3://{other}/up").nbytes)
""")
        assert results["allowed"] == ["ok", 4096]
        for label in ("another bucket", "upload elsewhere"):
            assert results[label][0] == "PermissionDenied" and "[tenants.team-a] buckets" in results[label][1], label
        for label in ("a way out", "escaped"):
            assert results[label][0] == "PermissionDenied" and "not a plain scheme://bucket/key" in results[label][1]
        assert "Contents" not in s3.client().list_objects_v2(Bucket=other, Prefix="up/")
        assert daemon.client().push(f"s3://{other}/models/m.safetensors", "team-a/o").nbytes == 4096  # an admin: anywhere


def test_the_socket_directory_keeps_its_special_bits(tmp_path):
    import stat as stat_module

    from trims.daemon import _open_directory_to_socket_users

    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    _open_directory_to_socket_users(sticky, 0o666, None)
    assert stat_module.S_IMODE(sticky.stat().st_mode) == 0o1777  # /tmp-like: left alone
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    _open_directory_to_socket_users(private, 0o666, None)
    assert stat_module.S_IMODE(private.stat().st_mode) == 0o711  # search only, for group and others


def test_a_client_maps_only_sealed_segments():
    """A process at the socket that is not a trims daemon could hand out memory it goes on
    writing: the client maps only memfds sealed against writes, growing and shrinking."""
    import fcntl

    from trims.client import _check_sealed

    unsealed = os.memfd_create("imposter", os.MFD_ALLOW_SEALING)
    sealed = os.memfd_create("daemon", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(sealed, 4096)
        fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        _check_sealed(sealed)
        with pytest.raises(trims.IntegrityError, match="not sealed"):
            _check_sealed(unsealed)
    finally:
        os.close(unsealed)
        os.close(sealed)


def test_the_shared_tmp_fallback_directory_must_be_the_users_own(tmp_path, monkeypatch):
    """/tmp/trims-<uid> can be made first by anyone: a client refuses one that others may write
    to or that someone else made, before it sends any file there."""
    from trims import config

    directory = tmp_path / "trims-fallback"
    directory.mkdir(mode=0o700)
    monkeypatch.setattr(config, "_shared_tmp_runtime_dir", lambda: directory)
    config.check_socket_directory(directory / "trims.sock")
    config.check_socket_directory(tmp_path / "elsewhere" / "trims.sock")  # the operator's choice
    directory.chmod(0o777)
    with pytest.raises(trims.DaemonUnavailable, match="another user may be listening there"):
        trims.connect(directory / "trims.sock")
