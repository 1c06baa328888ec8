"""Glue to the libraries users already run: `attndsl.integrations.transformers` (Hugging Face
transformers' attention interface; the `attndsl[hf]` extra)."""
