"""gw_ext/sqlitebulk.pyx: rows through SQLite's C API on a Python sqlite3
connection's handle, against sqlite3's own executemany on a real store file."""

from __future__ import annotations

import sqlite3

import pytest

sqlitebulk = pytest.importorskip("gw_ext.sqlitebulk")

TABLE = ("CREATE TABLE t (a INTEGER NOT NULL, b INTEGER, c TEXT NOT NULL, d REAL NOT NULL, e TEXT, "
         "UNIQUE (a, b))")
INSERT = "INSERT INTO t VALUES (?,?,?,?,?)"
UPSERT = "INSERT INTO t VALUES (?,?,?,?,?) ON CONFLICT (a, b) DO UPDATE SET d = t.d + excluded.d"


def connect(path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(TABLE)
    return conn


def rows(n: int, start: int = 0) -> list[tuple]:
    # ints past 32 bits, None, text with non-ASCII and NUL-free escapes, floats of every kind
    return [(i % 7, i * 10_000_000_000 + 1 if i % 4 else None, f"d-{i}-\u00e9\u4e2d", i / 3 - 1e-300 * i,
             None if i % 5 == 0 else '{"x":"\\"y"}' * (i % 3)) for i in range(start, start + n)]


def test_rows_as_sqlite3_stores_them(tmp_path):
    a = connect(tmp_path / "a.db")
    b = connect(tmp_path / "b.db")
    handle = sqlitebulk.handle_of(b)
    assert handle is not None
    data = rows(40000)                      # more than two blocks of 16,384 rows, the last one partial
    a.execute("BEGIN")
    a.executemany(INSERT, data)
    a.executemany(UPSERT, data[:3000:3])
    a.execute("COMMIT")
    b.execute("BEGIN")
    assert sqlitebulk.executemany(b, handle, INSERT, data) == 40000
    assert sqlitebulk.executemany(b, handle, UPSERT, data[:3000:3]) == 1000
    b.execute("COMMIT")
    q = "SELECT rowid, a, b, c, d, e, typeof(b), typeof(d) FROM t ORDER BY rowid"
    assert a.execute(q).fetchall() == b.execute(q).fetchall()
    assert sqlitebulk.executemany(b, handle, INSERT, []) == 0


def test_a_constraint_raises_integrity_error_and_the_transaction_rolls_back(tmp_path):
    conn = connect(tmp_path / "a.db")
    handle = sqlitebulk.handle_of(conn)
    conn.execute("BEGIN")
    sqlitebulk.executemany(conn, handle, INSERT, rows(10))
    with pytest.raises(sqlite3.IntegrityError):
        sqlitebulk.executemany(conn, handle, INSERT, rows(3000, start=8))
    assert conn.in_transaction
    conn.execute("ROLLBACK")
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0


def test_bad_rows_are_refused_before_they_are_stepped(tmp_path):
    conn = connect(tmp_path / "a.db")
    handle = sqlitebulk.handle_of(conn)
    with pytest.raises(sqlite3.ProgrammingError):
        sqlitebulk.executemany(conn, handle, INSERT, [(1, 2, "x")])
    with pytest.raises(TypeError):
        sqlitebulk.executemany(conn, handle, INSERT, rows(3) + [(1, 2, b"bytes", 1.0, None)])
    with pytest.raises(sqlite3.OperationalError):
        sqlitebulk.executemany(conn, handle, "INSERT INTO nowhere VALUES (?)", [(1,)])
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0


def test_handle_only_when_sqlite_confirms_it(tmp_path):
    assert sqlitebulk.handle_of(sqlite3.connect(":memory:")) is None      # no file to confirm it by
    assert sqlitebulk.handle_of(object()) is None
    conn = connect(tmp_path / "a.db")
    other = connect(tmp_path / "b.db")
    assert sqlitebulk.handle_of(conn) != sqlitebulk.handle_of(other)
