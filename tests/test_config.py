"""`gw serve` configuration: defaults < TOML file < flags; errors are one line
naming the key, exit code 2; `gw config` prints every key."""

from __future__ import annotations

import socket
import tomllib

import pytest

from conftest import (HOST, GwServer, counter_delta, free_ports, mqtt_client, publish_packet,
                      read_packet, run_gw, wait_closed)
from gw.config import SETTINGS


def assert_one_line_error(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("gw: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("args, needles", [
    (["--workers", "abc"], ["--workers"]),
    (["--workers", "0"], ["'workers'"]),
    (["--workers", "65"], ["'workers'"]),
    (["--max-packet-size", "10"], ["'max_packet_size'"]),
    (["--connect-timeout", "soon"], ["--connect-timeout"]),
    (["--mqtt", "nonsense"], ["'mqtt'"]),
    (["--mqtt", "127.0.0.1:70000"], ["'mqtt'"]),
    (["--log-level", "loud"], ["'log_level'"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("--") else None)
def test_invalid_flag_value(tmp_path, args, needles):
    res = run_gw("serve", *args, "--data-dir", tmp_path / "data", "--certs", tmp_path / "certs",
                 cwd=tmp_path)
    assert_one_line_error(res, *needles)
    assert not (tmp_path / "data" / "gw.pid").exists()


def test_unknown_flag(tmp_path):
    res = run_gw("serve", "--bogus-flag", "1", cwd=tmp_path)
    assert_one_line_error(res, "--bogus-flag")


def test_every_listener_off_is_an_error(tmp_path):
    res = run_gw("serve", "--mqtt", "off", "--mqtts", "off", "--json", "off", "--jsons", "off",
                 "--http", "off", "--https", "off", "--ws", "off", "--wss", "off", cwd=tmp_path)
    assert_one_line_error(res, "'mqtt'")


@pytest.mark.parametrize("toml, needles", [
    ("bogus_key = 1\n", ["'bogus_key'"]),
    ("max_connections = \"many\"\n", ["'max_connections'"]),
    ("workers = true\n", ["'workers'"]),
    ("connect_timeout = \"soon\"\n", ["'connect_timeout'"]),
    ("stats_interval = -1\n", ["'stats_interval'"]),
    ("mqtt = 1883\n", ["'mqtt'"]),
    ("[gw]\nmax_outbound = 1\n", ["'max_outbound'"]),
], ids=["unknown-key", "string-for-int", "bool-for-int", "string-for-float", "below-minimum",
        "int-for-address", "gw-table"])
def test_bad_toml(tmp_path, toml, needles):
    cfg = tmp_path / "gw.toml"
    cfg.write_text(toml)
    res = run_gw("serve", "--config", cfg, cwd=tmp_path)
    assert_one_line_error(res, *needles)


def test_invalid_toml_syntax_and_missing_file(tmp_path):
    cfg = tmp_path / "gw.toml"
    cfg.write_text("max_connections = \n")
    assert_one_line_error(run_gw("serve", "--config", cfg, cwd=tmp_path), str(cfg))
    missing = tmp_path / "nope.toml"
    assert_one_line_error(run_gw("serve", "--config", missing, cwd=tmp_path), str(missing))


def test_gw_config_prints_every_key(tmp_path):
    res = run_gw("config")
    assert res.returncode == 0, res.stderr
    parsed = tomllib.loads(res.stdout)
    assert set(parsed) == set(SETTINGS)
    for key, f in SETTINGS.items():
        assert parsed[key] == f.default, key
    # ...and the printed file is a valid config for `gw serve` (checked by loading it).
    from gw.config import load_config

    path = tmp_path / "all.toml"
    path.write_text(res.stdout)
    assert load_config(str(path)).max_packet_size == SETTINGS["max_packet_size"].default


def test_toml_values_applied_and_flags_override(tmp_path):
    """The file sets workers=1, mqtt, json and max_packet_size=200; the flags
    override workers (2) and json (another port). Observed: 2 workers, mqtt on
    the file's port, json on the flag's port (not the file's), and a 300-byte
    packet closed for size while a 150-byte one is acknowledged."""
    p_mqtt, p_json_file, p_json_flag = free_ports(3)
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        "workers = 1\n"
        f'mqtt = "{HOST}:{p_mqtt}"\n'
        'mqtts = "off"\n'
        f'json = "{HOST}:{p_json_file}"\n'
        'jsons = "off"\n'
        'http = "off"\n'
        'https = "off"\n'
        'ws = "off"\n'
        'wss = "off"\n'
        "max_packet_size = 200\n"
        "stats_interval = 0\n"
        f'data_dir = "{tmp_path / "data"}"\n'
        f'certs = "{tmp_path / "certs"}"\n')
    server = GwServer(tmp_path / "gw", argv=["--config", cfg, "--workers", "2",
                                             "--json", f"{HOST}:{p_json_flag}"],
                      workers=2, ports={"mqtt": p_mqtt, "json": p_json_flag},
                      data_dir=tmp_path / "data", certs=tmp_path / "certs")
    try:
        server.start()
        assert len(server.worker_pids()) == 2
        assert (tmp_path / "data" / "gw.pid").read_text().strip() == str(server.pid)
        socket.create_connection((HOST, p_json_flag), timeout=5).close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((HOST, p_json_file), timeout=5).close()
        assert not (tmp_path / "certs").exists()      # no TLS listener: no certificates made
        with mqtt_client(p_mqtt, "small") as sock:
            sock.sendall(publish_packet("t", b"x" * 140, qos=1, packet_id=7))
            assert read_packet(sock) == (0x40, b"\x00\x07")
        before = server.counters()
        with mqtt_client(p_mqtt, "big") as sock:
            sock.sendall(publish_packet("t", b"x" * 300, qos=1, packet_id=8))
            assert wait_closed(sock) == b""
        after = server.counters()
        assert counter_delta(before, after, "packets_too_large") == 1
    finally:
        server.stop()
