# cython: language_level=3
"""Counter indices and block layout (stats.pxd), exported as module constants.

gw/stats.py turns them into the Counter and Layout enums Python code uses.
"""
