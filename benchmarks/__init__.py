"""Performance harness (not tests): every figure is a ratio against a bare PyTorch loop in the same run."""
