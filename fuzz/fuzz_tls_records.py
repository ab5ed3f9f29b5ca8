"""Fuzz target `tls_records`: gw's TLS 1.3 record parser (gw_ext/tls_records.c,
the read side of tls_record_layer = gw, through loop.tls_records_open) on any
bytes, and on records sealed by its own sealing side then damaged.

The first byte picks the suite (bits 0-1) and the mode (bit 2): raw, the rest
of the input opened as it is (it must be refused or wait for more, never
crash or hand over bytes no key sealed, since no tag can match); or sealed,
the rest split at byte 1's value: plaintext records of the first part (inner
type from byte 2), then the second part XORed into the wire from its start.
Undamaged, what was sealed opens to the same plaintext, whole; damaged, it is
refused (-3), stops at a partial record (0 consumed past whole records), or
opens only what the damage left intact before it.

    ./dev fuzz tls_records 60
"""

from __future__ import annotations

import common  # the import path of the instrumented build first; the fuzzing loop

SUITES = ((0x1301, 32), (0x1302, 48), (0x1303, 32), (0x1301, 32))


def TestOneInput(data: bytes) -> None:
    from gw_ext import loop

    if len(data) < 3:
        return
    suite, hlen = SUITES[data[0] & 3]
    secret = bytes(range(1, hlen + 1))
    if not data[0] & 4:
        status, plain, used = loop.tls_records_open(suite, secret, data[1:], 1 << 16)
        if used > len(data) - 1 or (status > 0 and (len(plain) != status or status > used)):
            raise AssertionError(f"opened {status} bytes, {len(plain)} handed over, {used} consumed")
        if status > 0 and loop.tls_records_open(suite, secret, data[1:1 + used], 1 << 16)[1] != plain:
            raise AssertionError("the records consumed open to other bytes on their own")
        return
    ctype = (23, 23, 21, 22)[data[2] & 3]
    split = 3 + data[1] * 4
    plain, damage = data[3:split], data[split:]
    if ctype == 21:
        plain = plain[:2]
    wire = loop.tls_records_seal(suite, secret, plain, 0, ctype)
    damaged = bytes(w ^ d for w, d in zip(wire, damage)) + wire[len(damage):]
    status, got, used = loop.tls_records_open(suite, secret, damaged, 1 << 20)
    if damaged == wire:
        if ctype == 23 and (status, got, used) != (len(plain), plain, len(wire)):
            raise AssertionError(f"sealed data did not open: {status} {used}/{len(wire)}")
        return
    if status > 0 and not plain.startswith(got):
        raise AssertionError("damaged records opened to other bytes")
    if used > len(damaged):
        raise AssertionError("consumed past the input")


def main() -> None:
    common.fuzz(TestOneInput)


if __name__ == "__main__":
    main()
