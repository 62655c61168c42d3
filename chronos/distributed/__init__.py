"""distributed layer (see DESIGN.md)."""
