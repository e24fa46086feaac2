"""moon3.registry: MLflow Model Registry and CI-gated promotion (register, promote, rollback)."""
