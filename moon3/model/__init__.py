"""moon3.model."""
