"""continuum layer (see DESIGN.md)."""
