"""Two ids that are not tokens, shared by the data pipeline and the model.

They are the whole contract between `data.py` and `model.py`: the data pipeline writes
IMAGE_TOKEN_ID once per image feature position and IGNORE_INDEX wherever a label is not
supervised; the model overwrites the former with image features and skips the latter in the loss.
"""
IMAGE_TOKEN_ID = -200  # LLaVA's IMAGE_TOKEN_INDEX: below every vocabulary, so no token collides
IGNORE_INDEX = -100  # the label value F.cross_entropy skips (its default ignore_index)
