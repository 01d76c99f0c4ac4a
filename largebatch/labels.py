"""Label conventions shared by data and models (neither imports the other)."""

IGNORE_INDEX = -100  # the label of a position that carries no target (torch's cross_entropy default)
