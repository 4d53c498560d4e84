"""Test-only helpers (exact Gaussian denoiser, tiny offline BERT): used by tests/ and bench/, not shipped."""
