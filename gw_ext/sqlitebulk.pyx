# cython: language_level=3
"""Many rows into one SQLite statement through the C API, on a Python sqlite3
connection's own database handle (the same libsqlite3 the sqlite3 module uses).

`executemany(conn, sql, rows)` does what `conn.executemany(sql, rows)` does for
rows of int, float, str and None (one prepared statement, bound and stepped per
row, inside the caller's transaction) at about half its cost per row, and
steps the rows without the GIL, in blocks of up to 16,384 rows: the values of a block are taken
from the Python objects first (text bound in place, SQLITE_STATIC: the rows
hold the strings until the call returns), then stepped. A row with another
type raises TypeError before any row of its block is stepped; a failing step
raises sqlite3.IntegrityError (a constraint) or sqlite3.OperationalError, with
the rows before it inserted, as sqlite3's executemany does; the caller rolls
back.

`handle_of(conn)` finds the connection's `sqlite3 *`: CPython's sqlite3
Connection object holds it as its first field (every CPython since 2.5); it is
taken only when SQLite confirms it (the same library version, and the handle
names the connection's own database file), else None and the caller keeps
sqlite3's executemany.
"""

from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from cpython.float cimport PyFloat_AS_DOUBLE
from libc.stdint cimport int64_t, uintptr_t
from libc.stdlib cimport malloc, free
from libc.string cimport strcmp

import sqlite3 as _sqlite3

cdef extern from "sqlite3.h" nogil:
    ctypedef struct sqlite3
    ctypedef struct sqlite3_stmt
    ctypedef void (*sqlite3_destructor_type)(void *)
    sqlite3_destructor_type SQLITE_STATIC
    int SQLITE_OK, SQLITE_DONE, SQLITE_ROW, SQLITE_CONSTRAINT
    int sqlite3_prepare_v2(sqlite3 *db, const char *sql, int nbytes, sqlite3_stmt **stmt, const char **tail)
    int sqlite3_bind_int64(sqlite3_stmt *, int, long long)
    int sqlite3_bind_double(sqlite3_stmt *, int, double)
    int sqlite3_bind_text(sqlite3_stmt *, int, const char *, int, sqlite3_destructor_type)
    int sqlite3_bind_null(sqlite3_stmt *, int)
    int sqlite3_bind_parameter_count(sqlite3_stmt *)
    int sqlite3_step(sqlite3_stmt *)
    int sqlite3_reset(sqlite3_stmt *)
    int sqlite3_clear_bindings(sqlite3_stmt *)
    int sqlite3_finalize(sqlite3_stmt *)
    const char *sqlite3_errmsg(sqlite3 *)
    int sqlite3_extended_errcode(sqlite3 *)
    const char *sqlite3_db_filename(sqlite3 *, const char *)
    const char *sqlite3_libversion()


cdef struct PyConnection:        # CPython's pysqlite_Connection, its first field
    Py_ssize_t ob_refcnt
    void *ob_type
    sqlite3 *db


cdef enum:
    # Rows whose values are taken before they are stepped without the GIL: few
    # blocks a call, so a call on a thread of its own seldom waits for the GIL
    # (another thread holding it keeps it up to the switch interval, 5 ms); at
    # most 16,384 x columns x 32 bytes (4 MiB for 8 columns).
    BLOCK = 16384
    K_NULL = 0
    K_INT = 1
    K_FLOAT = 2
    K_TEXT = 3


cdef struct Cell:
    int kind
    int n
    int64_t i
    double d
    const char *s


def handle_of(conn) -> int | None:
    """The connection's sqlite3 handle as an int, or None when it cannot be confirmed."""
    if type(conn) is not _sqlite3.Connection:
        return None
    if _sqlite3.sqlite_version != sqlite3_libversion().decode():
        return None
    cdef sqlite3 *db = (<PyConnection *><PyObject *>conn).db
    if db == NULL:
        return None
    want = None
    for _seq, name, path in conn.execute("PRAGMA database_list"):
        if name == "main":
            want = path
    if not want:
        return None
    cdef const char *got = sqlite3_db_filename(db, "main")
    if got == NULL or got.decode(errors="replace") != want:
        return None
    return <uintptr_t>db


def executemany(conn, handle, str sql, list rows) -> int:
    """conn.executemany(sql, rows) through the handle from handle_of(conn): rows inserted."""
    cdef sqlite3 *db = <sqlite3 *><uintptr_t>handle
    cdef sqlite3_stmt *stmt = NULL
    cdef bytes q = sql.encode()
    cdef int rc, ncols, c
    cdef Py_ssize_t nrows = len(rows), start = 0, end, r, k, done = 0
    cdef Py_ssize_t size
    cdef Cell *cells = NULL
    cdef Cell *cell
    cdef object v
    cdef tuple row
    if nrows == 0:
        return 0
    rc = sqlite3_prepare_v2(db, q, <int>len(q), &stmt, NULL)
    if rc != SQLITE_OK:
        raise _sqlite3.OperationalError(sqlite3_errmsg(db).decode(errors="replace"))
    try:
        ncols = sqlite3_bind_parameter_count(stmt)
        cells = <Cell *>malloc(sizeof(Cell) * min(nrows, <Py_ssize_t>BLOCK) * max(ncols, 1))
        if cells == NULL:
            raise MemoryError()
        while start < nrows:
            end = min(start + BLOCK, nrows)
            # The block's values, with the GIL.
            for r in range(start, end):
                row = <tuple?>rows[r]
                if len(row) != ncols:
                    raise _sqlite3.ProgrammingError(
                        f"Incorrect number of bindings supplied. The current statement uses {ncols}, "
                        f"and there are {len(row)} supplied.")
                for c in range(ncols):
                    cell = &cells[(r - start) * ncols + c]
                    v = row[c]
                    if v is None:
                        cell.kind = K_NULL
                    elif type(v) is int:
                        cell.kind = K_INT
                        cell.i = v
                    elif type(v) is float:
                        cell.kind = K_FLOAT
                        cell.d = PyFloat_AS_DOUBLE(v)
                    elif type(v) is str:
                        cell.kind = K_TEXT
                        cell.s = PyUnicode_AsUTF8AndSize(v, &size)
                        if size > 0x7fffffff:
                            raise OverflowError("string longer than INT_MAX bytes")
                        cell.n = <int>size
                    else:
                        raise TypeError(f"row {r}, column {c}: {type(v).__name__} is not stored by executemany")
            # The block stepped, without it.
            with nogil:
                for r in range(end - start):
                    for c in range(ncols):
                        cell = &cells[r * ncols + c]
                        if cell.kind == K_INT:
                            rc = sqlite3_bind_int64(stmt, c + 1, cell.i)
                        elif cell.kind == K_FLOAT:
                            rc = sqlite3_bind_double(stmt, c + 1, cell.d)
                        elif cell.kind == K_TEXT:
                            rc = sqlite3_bind_text(stmt, c + 1, cell.s, cell.n, SQLITE_STATIC)
                        else:
                            rc = sqlite3_bind_null(stmt, c + 1)
                        if rc != SQLITE_OK:
                            break
                    if rc != SQLITE_OK:
                        break
                    rc = sqlite3_step(stmt)
                    if rc == SQLITE_ROW:          # a RETURNING clause: its rows are not wanted here
                        while rc == SQLITE_ROW:
                            rc = sqlite3_step(stmt)
                    if rc != SQLITE_DONE:
                        break
                    rc = sqlite3_reset(stmt)
                    if rc != SQLITE_OK:
                        break
                    done += 1
            if rc != SQLITE_OK and rc != SQLITE_DONE:
                msg = sqlite3_errmsg(db).decode(errors="replace")
                if (sqlite3_extended_errcode(db) & 0xff) == SQLITE_CONSTRAINT:
                    raise _sqlite3.IntegrityError(msg)
                raise _sqlite3.OperationalError(msg)
            start = end
    finally:
        if cells != NULL:
            free(cells)
        sqlite3_finalize(stmt)
    return done
