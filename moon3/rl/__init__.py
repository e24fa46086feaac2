"""moon3.rl."""
