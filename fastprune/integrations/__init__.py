"""Adapters for training frameworks: ``fastprune.integrations.lightning`` (PyTorch Lightning) and
``fastprune.integrations.accelerate`` (Hugging Face Accelerate).

Each adapter imports its framework when it is itself imported, so ``import fastprune`` never needs
them; install them with ``pip install 'fastprune[lightning]'`` or ``'fastprune[accelerate]'``.
"""
