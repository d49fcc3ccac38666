"""Attention families: one file each. Every module's forward is (x, context=None, mask=None) -> (y,
Routing|None)."""
