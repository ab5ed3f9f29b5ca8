# Type stub of the ACL's per-message check (acl.pyx).
from gw.acl import AclFile

class AclRules:
    """One version of the ACL file, ready for the worker's checks."""

    generation: int
    file: AclFile
    def __init__(self, acl_file: AclFile) -> None: ...
    def check(self, username: bytes | None, client_id: bytes, topic: bytes, access: int) -> bool: ...
    @property
    def rule_count(self) -> int: ...

class AclSession:
    """One session's view (the cache, then the tries), as the worker checks."""

    rules: AclRules
    def __init__(self, rules: AclRules, username: bytes | None, client_id: bytes) -> None: ...
    def allowed(self, topic: bytes, access: int) -> bool: ...
    def allowed_many(self, topic: bytes, access: int, n: int) -> int: ...
