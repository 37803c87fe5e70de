"""The ActivityCube (cube.py), its file formats (export.py: JSON, gzip, npz, streamed and atomic)
and the provenance written with it (provenance.py)."""

from recon_fast.cube.cube import ActivityCube

__all__ = ["ActivityCube"]
