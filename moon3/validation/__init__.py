"""moon3.validation."""
