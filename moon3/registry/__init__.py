"""moon3.registry: MLflow model registry and CI-gated promotion. Not built yet (an empty placeholder)."""
