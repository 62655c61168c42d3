"""solver layer (see DESIGN.md)."""
