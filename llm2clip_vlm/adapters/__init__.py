"""Importable shims for other codebases (the instructions and examples live in the repository's
top-level ``adapters/`` folder, one README per codebase)."""
