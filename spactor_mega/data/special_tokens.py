"""T5's special token ids and the rule for which ids are special, for every layer from tokenizer to model.

Pure Python (no SentencePiece, numpy or torch), so the span corruption, the batches, the model
and the checkpoint converters share these without loading the tokenizer.

- SentencePiece pieces keep their ids: pad 0 (also the decoder's start token), EOS 1, unk 2.
- Ids at or above ``sp_size`` (the SentencePiece vocabulary size) are the sentinels
  ``<extra_id_k>`` and SpacTor's mask token.
"""

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def special_mask(ids, sp_size: int):
    """True where ``ids`` (a numpy array or a torch tensor) is pad, EOS, a sentinel or the mask:
    the tokens MLM never masks."""
    return (ids == PAD_ID) | (ids == EOS_ID) | (ids >= sp_size)
