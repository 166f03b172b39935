"""Shared builders of the tests: tiny checkpoints written by transformers, multimodal
and MTP configurations, media files.  Fixtures live in conftest.py."""
