"""Load a sweep from the stores (MLflow, Optuna) into pandas, fit, chart and report. Never imports trainers/."""
