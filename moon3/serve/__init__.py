"""moon3.serve."""
