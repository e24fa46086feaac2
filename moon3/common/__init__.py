"""Small helpers shared by several stages (provenance of runs and reports)."""
