"""Training recipes, the training loop and its measurements. Imports neither optuna nor mlflow."""
