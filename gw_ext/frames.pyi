# Type stub of the frame format between workers (frames.pyx, frames.pxd).

FRAME_HEADER: int
FR_PUBLISH: int
FR_SUB_ADD: int
FR_SUB_DEL: int
FR_HELLO: int
FR_RETAIN: int
FR_CLAIM: int
FR_GRANT: int
FR_EVICT: int
FR_SESSION: int
FR_RELEASE: int
FR_REGISTER: int
FR_PAUSE: int
FR_RESUME: int
FR_SUB_SYNC: int
FR_SUB_SYNCED: int
FR_PIECE: int
FR_CHECK: int
FR_CHECKED: int
FR_SHARED_COUNT: int
FR_SHARED_PUBLISH: int
PIECE_FIRST: int
PIECE_LAST: int
PUB_EXT: int
MAX_TOPIC: int

def frame(ftype: int, body: bytes = b"", flags: int = 0, topic_len: int = 0) -> bytes: ...
def publish_frame(topic: bytes, payload: bytes, qos: int = 0, retain: bool = False, origin_ns: int = 0,
                  ext: bytes = b"") -> bytes: ...
