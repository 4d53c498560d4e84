"""Caption-encoding defaults: one source for the sharder's `encoder:` section, the loader's `data:`
section and `model.text_encoder.TextEncoder` (the configs override them). Dependency-free.
"""

PRODUCTION_ENCODER = "bert-large-uncased"  # the paper's text encoder: BERT-large token embeddings
MAX_CAPTION_TOKENS = 77  # captions are cut to this many tokens when encoded and when loaded
