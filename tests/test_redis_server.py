"""The test Redis: a real server the project starts and stops itself, restartable on its port."""

from __future__ import annotations

from pathlib import Path

import redis

from chimera.util.redis_server import RedisServer


def test_session_redis_answers(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    assert r.ping()
    assert r.eval("return redis.call('TIME')[1]", 0)  # server-side scripts run (the shared caps need them)


def test_stop_and_start_on_the_same_port():
    server = RedisServer().start()
    try:
        port = server.port
        r = redis.Redis.from_url(server.url, socket_timeout=0.5)
        r.set("k", "v")
        server.stop()
        assert not server.running
        server.start()
        assert server.port == port and r.get("k") is None  # no persistence: a restart comes back empty
    finally:
        server.stop()
    assert server.proc is None


def test_a_relative_log_folder_works(tmp_path, monkeypatch):
    """redis-server changes into its --dir before opening --logfile: a relative folder must not break the start."""
    monkeypatch.chdir(tmp_path)
    server = RedisServer(log_dir=Path("out/redis")).start()
    try:
        assert redis.Redis.from_url(server.url).ping() and server.log.is_absolute()
    finally:
        server.stop()
    assert (tmp_path / "out" / "redis" / server.log.name).exists()
