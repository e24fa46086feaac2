"""moon3.eval."""
