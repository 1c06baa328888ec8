"""Kernel generation from the typed IR (Triton, CPU block-sparse): planned in issues 4 and 5.

Nothing here is used yet; the reference backend in attndsl/reference.py is the only backend.
"""
