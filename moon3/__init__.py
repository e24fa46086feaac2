"""moon3."""
