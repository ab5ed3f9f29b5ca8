"""The ACL file (setting `acl_file`), in Mosquitto's format, parsed and checked.

    # a comment
    topic [read|write|readwrite|deny] FILTER     (no access word: readwrite)
    user NAME                                    (the topic lines after it are NAME's)
    pattern [read|write|readwrite|deny] FILTER   (every client; %c its client id, %u its user name)

Topic lines before the first `user` line apply to clients that gave no user
name. With an ACL file, what no line grants is denied, and a `deny` line wins
over any grant. A line that does not parse refuses the whole file
(`AclError`, naming the line): the running ACL stays in force.

This module is the file's format and the rules' meaning, for a whole filter
(SUBSCRIBE). The per-message check is the worker's (gw_ext/acl.pyx): the same
rules in a topic trie per identity, behind a per-session cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

READ = 1
WRITE = 2
DENY = 4            # a deny line: no access, whatever else grants it
ACCESS_WORDS = {"read": READ, "write": WRITE, "readwrite": READ | WRITE, "deny": DENY}


class AclError(Exception):
    """A file that cannot be used; the message names the file and the line."""


@dataclass
class AclFile:
    anonymous: list = field(default_factory=list)     # [(access, filter)] for clients without a user name
    users: dict = field(default_factory=dict)         # user name (bytes) -> [(access, filter)]
    patterns: list = field(default_factory=list)      # [(access, filter with %c / %u)]

    @property
    def rule_count(self) -> int:
        return len(self.anonymous) + sum(len(r) for r in self.users.values()) + len(self.patterns)

    def rules_for(self, username: bytes | None, client_id: bytes) -> list:
        """The (access, filter) rules of one identity, patterns substituted.
        A client id or user name with a wildcard in it gets no pattern at all
        (it would widen them), only its topic lines, as Mosquitto does."""
        rules = list(self.anonymous if username is None else self.users.get(username, ()))
        if _has_wildcard(client_id) or _has_wildcard(username):
            return rules
        for access, pattern in self.patterns:
            if b"%u" in pattern and username is None:
                continue        # no user name to put in: the line does not apply
            filt = pattern.replace(b"%c", client_id)
            if username is not None:
                filt = filt.replace(b"%u", username)
            rules.append((access, filt))
        return rules

    def may_subscribe(self, username: bytes | None, client_id: bytes, topic_filter: bytes) -> bool:
        """A SUBSCRIBE's filter is refused (SUBACK 0x80) when no topic it can
        match is readable: a deny line covers all of it, or no read grant
        overlaps it. A filter wider than the grants (`#` with read on `a/#`)
        is granted; each message is then checked at delivery (Mosquitto 2.0)."""
        rules = self.rules_for(username, client_id)
        f = topic_filter.split(b"/")
        if any(access & DENY and _covers(g.split(b"/"), f) for access, g in rules):
            return False
        return any(access & READ and _overlap(g.split(b"/"), f) for access, g in rules)


def _has_wildcard(value: bytes | None) -> bool:
    return value is not None and (b"+" in value or b"#" in value)


def _dollar_mismatch(a: list, b: list) -> bool:
    # A filter starting with a wildcard never matches a '$' topic (MQTT-4.7.2-1).
    return (a[0][:1] == b"$" and b[0] in (b"+", b"#")) or (b[0][:1] == b"$" and a[0] in (b"+", b"#"))


def _overlap(a: list, b: list) -> bool:
    """Some topic name matches both filters (given as their levels)."""
    if _dollar_mismatch(a, b):
        return False
    i = 0
    while True:
        if i < len(a) and a[i] == b"#" or i < len(b) and b[i] == b"#":
            return True
        if i == len(a) or i == len(b):
            # One ended: the other may go on only with a trailing '#' (a/# matches a).
            rest = a[i:] or b[i:]
            return not rest or rest == [b"#"]
        if a[i] != b[i] and a[i] != b"+" and b[i] != b"+":
            return False
        i += 1


def _covers(g: list, f: list) -> bool:
    """Every topic name f matches, g matches too."""
    if g[0] in (b"+", b"#") and f[0][:1] == b"$":
        return False            # g's leading wildcard matches no '$' topic (MQTT-4.7.2-1)
    for i, level in enumerate(g):
        if level == b"#":
            return True
        if i >= len(f):
            return False
        if f[i] == b"#":
            return False        # f goes deeper than g or has levels g does not allow
        if level == b"+":
            continue
        if f[i] != level:       # f's '+' is wider than one name
            return False
    return len(f) == len(g)


def valid_filter(f: bytes) -> bool:
    """MQTT's rules for a topic filter: not empty, '#' alone and last, '+' alone in its level, no NUL."""
    if not f or b"\0" in f or len(f) > 65535:
        return False
    levels = f.split(b"/")
    for i, level in enumerate(levels):
        if b"#" in level and (level != b"#" or i != len(levels) - 1):
            return False
        if b"+" in level and level != b"+":
            return False
    return True


def parse_acl(text: str, path: str = "<acl>") -> AclFile:
    acl = AclFile()
    current: list = acl.anonymous
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, rest = (line.split(None, 1) + [""])[:2]
        rest = rest.strip()

        def fail(why: str):
            raise AclError(f"{path}, line {lineno}: {why}: {raw.strip()!r}")

        if keyword == "user":
            if not rest:
                fail("'user' without a user name")
            current = acl.users.setdefault(rest.encode(), [])
            continue
        if keyword not in ("topic", "pattern"):
            fail(f"unknown keyword {keyword!r} (expected topic, user or pattern)")
        word, after = (rest.split(None, 1) + [""])[:2]
        if word in ACCESS_WORDS and after.strip():
            access, filt = ACCESS_WORDS[word], after.strip()
        elif word in ACCESS_WORDS:
            fail(f"'{keyword} {word}' without a topic")
        else:
            access, filt = READ | WRITE, rest
        if not filt:
            fail(f"'{keyword}' without a topic")
        encoded = filt.encode()
        if not valid_filter(encoded):
            fail(f"not a valid topic filter: {filt!r}")
        (acl.patterns if keyword == "pattern" else current).append((access, encoded))
    return acl


def load_acl(path: str) -> AclFile:
    """Reads and parses the file; AclError (naming the file) when it cannot."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise AclError(f"{path}: cannot read the ACL file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise AclError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    return parse_acl(text, path)
