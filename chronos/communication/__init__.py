"""communication layer (see DESIGN.md)."""
