"""lazybench's Additional Layer Store: eStargz layers served lazily from a registry over FUSE.

Layers, each usable without the ones above it:
``estargz`` (format) ← ``registry`` (blob source) ← cache ← layer ← filesystem.
The store never imports ``harness``.
"""
