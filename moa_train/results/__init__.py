"""Drivers that reproduce the papers' tables and rebuild docs/results/ from the committed run records."""
