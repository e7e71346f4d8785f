"""Maintainer tools that are not part of the installed package (see tools/gpu_kit)."""
