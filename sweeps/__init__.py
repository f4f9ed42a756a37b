"""The glue: sweep configs, Optuna studies, MLflow tracking and the `batchscope` CLI."""
