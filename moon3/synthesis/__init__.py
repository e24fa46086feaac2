"""moon3.synthesis."""
