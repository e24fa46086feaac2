"""moon3.serve: the KServe predictor and search endpoint. Not built yet (an empty placeholder)."""
