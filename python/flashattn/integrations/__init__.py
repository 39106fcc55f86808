"""Adapters that plug flashattn into other libraries (imported on demand; none is a dependency)."""
