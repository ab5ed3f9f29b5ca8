# cython: language_level=3
"""The MQTT control packet types (packet_types.pxd), exported as module ints.

gw/packets.py re-exports them for Python code; Cython code cimports them.
"""
