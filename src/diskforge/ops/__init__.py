"""Whole operations on block devices, each usable from Python with a progress callback.

The CLI is a thin layer over these; nothing here imports a format by name.
"""
