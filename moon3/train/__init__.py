"""moon3.train."""
