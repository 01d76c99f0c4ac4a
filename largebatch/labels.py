"""Label conventions shared by data and models (neither imports the other)."""

IGNORE_INDEX = -100  # the label of a position that carries no target (torch's cross_entropy default)
# Special token ids of the translation vocabulary (largebatch.data.parallel builds it; models.seq2seq decodes)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
