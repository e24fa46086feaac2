"""moon3.data."""
