# The MQTT control packet types (MQTT 3.1.1 section 2.2.1), defined once for C
# and Python: Cython modules cimport them (gw_ext/codec.pxd re-exports them to
# its cimporters), Python reads them as ints off gw_ext.packet_types
# (gw/packets.py re-exports them). A module of its own because gw_ext.codec
# imports gw/packets.py, which could not import the codec back.

cpdef enum:
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
