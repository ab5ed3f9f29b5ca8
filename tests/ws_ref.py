"""A reference decoder of client WebSocket frames, read from RFC 6455 in plain
Python (no in-place tricks, whole input at once): the oracle of the frame
codec's property tests (tests/test_wsframe.py) and of the ws fuzz target.

decode(data, max_message) -> events, in order: ("data", bytes) (consecutive
data merged), ("end",) when a message's last frame is complete, ("ping", p),
("pong", p), ("close", code or 0, reason), ("error", close code); nothing
after a Close or an error. A frame cut short at the end of the input gives the
part of its payload that arrived (data frames) or nothing (control frames)."""

from __future__ import annotations

VALID_CLOSE = set(range(1000, 1004)) | set(range(1007, 1015)) | set(range(3000, 5000))


def merge(events: list) -> list:
    out: list = []
    for e in events:
        if e[0] == "data":
            if not e[1]:
                continue
            if out and out[-1][0] == "data":
                out[-1] = ("data", out[-1][1] + e[1])
                continue
        out.append(e)
    return out


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        return False
    return True


def decode(data: bytes, max_message: int) -> list:
    events: list = []
    pos = 0
    in_message = False
    message_len = 0
    n = len(data)
    while pos < n:
        if n - pos < 2:
            break
        b0, b1 = data[pos], data[pos + 1]
        fin, rsv, op = b0 >> 7, (b0 >> 4) & 7, b0 & 0xF
        if rsv or not b1 & 0x80:
            events.append(("error", 1002))
            break
        length = b1 & 0x7F
        hl = 6
        if length == 126:
            hl = 8
            if n - pos < hl:
                break
            length = int.from_bytes(data[pos + 2:pos + 4], "big")
        elif length == 127:
            hl = 14
            if n - pos < hl:
                break
            if data[pos + 2] & 0x80:
                events.append(("error", 1002))
                break
            length = int.from_bytes(data[pos + 2:pos + 10], "big")
        if n - pos < hl:
            break
        mask = data[pos + hl - 4:pos + hl]
        if op >= 8:
            if op not in (8, 9, 10) or not fin or length > 125:
                events.append(("error", 1002))
                break
            if n - pos < hl + length:
                break
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(data[pos + hl:pos + hl + length]))
            if op == 8:
                if length == 1:
                    events.append(("error", 1002))
                    break
                if length >= 2:
                    code = int.from_bytes(payload[:2], "big")
                    if code not in VALID_CLOSE:
                        events.append(("error", 1002))
                        break
                    if not _utf8(payload[2:]):
                        events.append(("error", 1007))
                        break
                    events.append(("close", code, payload[2:]))
                else:
                    events.append(("close", 0, b""))
                break
            events.append(("ping" if op == 9 else "pong", payload))
            pos += hl + length
            continue
        if op not in (0, 1, 2) or (op == 0 and not in_message) or (op != 0 and in_message):
            events.append(("error", 1002))
            break
        if op == 1:
            events.append(("error", 1003))
            break
        total = length if op == 2 else message_len + length
        if length > max_message or total > max_message:
            events.append(("error", 1009))
            break
        message_len = total
        in_message = not fin
        body = data[pos + hl:pos + hl + length]
        events.append(("data", bytes(b ^ mask[i % 4] for i, b in enumerate(body))))
        if len(body) < length:
            break
        if fin:
            events.append(("end",))
        pos += hl + length
    return merge(events)
