"""moon3.registry."""
