"""Integrations with other libraries, each an optional dependency imported on demand:

- `lrkernels.integrations.transformers`: ``attn_implementation="lrkernels"`` for Hugging Face
  transformers models (importing it registers the name).
"""
