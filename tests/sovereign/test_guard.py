"""No-egress guard and shredding."""
import logging
import os
import socket
import threading

import pytest

from forge_rt import sovereign
from forge_rt.sovereign import shred
from forge_rt.sovereign import EgressBlocked


@pytest.fixture
def loopback_server():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        conn.sendall(conn.recv(16).upper())
        conn.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    t.join(5)
    srv.close()


def test_blocks_outbound_before_any_packet(caplog):
    orig_connect = socket.socket.connect
    with caplog.at_level(logging.WARNING, logger="forge_rt.sovereign"), sovereign.offline() as guard:
        assert os.environ["HF_HUB_OFFLINE"] == "1"
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with pytest.raises(EgressBlocked, match="203.0.113.1"):   # TEST-NET-3: our error, not a network timeout
            s.connect(("203.0.113.1", 9))
        with pytest.raises(EgressBlocked):
            s.connect_ex(("203.0.113.1", 9))
        s.close()
        with pytest.raises(EgressBlocked):
            socket.create_connection(("203.0.113.1", 9), timeout=0.5)
        with pytest.raises(EgressBlocked):
            socket.getaddrinfo("huggingface.co", 443)      # DNS is egress too
        assert socket.getaddrinfo("0.0.0.0", 80)           # IP literals need no DNS (binding servers works)
        u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        with pytest.raises(EgressBlocked):
            u.sendto(b"x", ("2001:db8::1", 9))
        u.close()
    rep = guard.report()
    assert rep["egress_attempted"] and len(rep["attempts"]) == 5
    assert rep["attempts"][0]["what"] == "connect" and "test_blocks_outbound" in rep["attempts"][0]["stack"]
    assert "blocked connect" in caplog.text
    assert socket.socket.connect is orig_connect            # uninstalled on exit


def test_allows_loopback_and_unix(loopback_server, tmp_path):
    with sovereign.offline() as guard:
        with socket.create_connection(("localhost", loopback_server), timeout=5) as c:
            c.sendall(b"ping")
            assert c.recv(16) == b"PING"
        a, b = socket.socketpair()          # Unix sockets
        a.sendall(b"ok")
        assert b.recv(2) == b"ok"
        a.close(), b.close()
        path = str(tmp_path / "sock")
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(path)
        srv.listen(1)
        cli = socket.socket(socket.AF_UNIX)
        cli.connect(path)
        cli.close(), srv.close()
    assert guard.report() == {"egress_attempted": False, "summary": "no egress attempted", "attempts": []}


def test_process_install_is_idempotent():
    g = sovereign.install()
    try:
        assert sovereign.install() is g and g.active
        with pytest.raises(EgressBlocked):
            socket.create_connection(("198.51.100.7", 80))
    finally:
        g.uninstall()
    assert not g.active


def test_shred_overwrites_then_unlinks(tmp_path, monkeypatch):
    d = tmp_path / "data"
    (d / "nested").mkdir(parents=True)
    secret = b"ana@example.org 4111111111111111\n" * 1000
    (d / "train.jsonl").write_bytes(secret)
    (d / "nested" / "eval.jsonl").write_bytes(b"x" * 3)
    (d / "empty.jsonl").write_bytes(b"")
    single = tmp_path / "retention.txt"
    single.write_bytes(b"keep out")

    seen = []   # capture what is on disk right before unlink: must be overwritten, not the original
    real_unlink = type(single).unlink

    def spy(self, *a, **k):
        if self.is_file() and not self.is_symlink():
            seen.append((self.name, self.read_bytes()))
        return real_unlink(self, *a, **k)
    monkeypatch.setattr(type(single), "unlink", spy)
    rec = shred.shred_paths([d, single])
    assert rec["files"] == 4 and rec["bytes"] == len(secret) + 3 + 8 and "SSD" in rec["caveat"]
    assert not d.exists() and not single.exists()
    before = dict(seen)
    assert len(before["train.jsonl"]) == len(secret) and before["train.jsonl"] != secret
    assert b"ana@example.org" not in before["train.jsonl"] and before["retention.txt"] != b"keep out"
    with pytest.raises(FileNotFoundError, match="nothing was shredded"):
        shred.shred_paths([tmp_path / "missing"])
