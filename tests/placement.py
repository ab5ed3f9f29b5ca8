"""Which gw worker holds the server side of a client's TCP connection, found in
about a millisecond: the kernel's sock_diag answers an exact 4-tuple lookup
with the server socket's inode, and the workers' fd tables say who holds it.
(psutil's net_connections parses the whole /proc/net/tcp per call, tens of
milliseconds on a busy machine: too slow for tests that place hundreds of
connections.) Linux only, loopback IPv4."""

from __future__ import annotations

import os
import socket
import struct
import time

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
ALL_STATES = 0xFFFFFFFF


def server_inode(sock: socket.socket) -> int:
    """The inode of the server's socket for this client connection; 0 while the
    server has not accepted it yet (or no longer has it)."""
    lhost, lport = sock.getsockname()[:2]
    rhost, rport = sock.getpeername()[:2]
    # The server's side of the connection: source (rhost, rport), destination (lhost, lport).
    sockid = (struct.pack("!HH", rport, lport) + socket.inet_aton(rhost) + bytes(12)
              + socket.inet_aton(lhost) + bytes(12) + struct.pack("=III", 0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
    req = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, ALL_STATES) + sockid
    msg = struct.pack("=IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + req
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.send(msg)
        data = nl.recv(65536)
    if len(data) < 16:
        return 0
    length, mtype = struct.unpack_from("=IH", data)
    if mtype != SOCK_DIAG_BY_FAMILY or length < 16 + 72:
        return 0                # NLMSG_ERROR: no such socket
    # inet_diag_msg: family, state, timer, retrans (u8 each), the 48-byte id, then
    # expires, rqueue, wqueue, uid, inode (u32 each).
    return struct.unpack_from("=5I", data, 16 + 4 + 48)[4]


def holder(pids, inode: int) -> int | None:
    """The pid among pids with that socket inode in its fd table."""
    if not inode:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


def worker_of(sock: socket.socket, pids, timeout: float = 5.0) -> tuple[int, int]:
    """(pid, inode) of the worker that accepted sock's connection (waits for the accept)."""
    deadline = time.monotonic() + timeout
    while True:
        inode = server_inode(sock)
        pid = holder(pids, inode)
        if pid is not None:
            return pid, inode
        if time.monotonic() >= deadline:
            raise AssertionError(f"no worker of {sorted(pids)} accepted the connection from port "
                                 f"{sock.getsockname()[1]} within {timeout} s")
        time.sleep(0.002)


def connect_on(port: int, pids: list[int], worker: int | None, attempts: int = 60) -> tuple[socket.socket, int, int]:
    """A TCP connection to port held by pids[worker] (any worker with None):
    (socket, worker index, server socket inode). Misplaced attempts are reset
    before they sent a byte, so they touch no MQTT state."""
    landed = []
    for _ in range(attempts):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            pid, inode = worker_of(sock, pids)
        except BaseException:
            sock.close()
            raise
        if worker is None or pid == pids[worker]:
            return sock, pids.index(pid), inode
        landed.append(pid)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    raise AssertionError(f"could not place a connection on worker {worker} (pid {pids[worker]}) in {attempts} "
                         f"attempts; they all landed on {sorted(set(landed))}")
