"""MLflow tracking: run artifacts, model logging and the model registry."""
