"""Figures: pure functions from tables (and maps) to matplotlib Figures; writing is the run folder's job."""
