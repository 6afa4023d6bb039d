"""Values that the data pipeline and the model must agree on."""

# Target id of a position that carries no loss (padding, a target in the next packed
# document, a non-answer token of a synthetic task).
IGNORE_LABEL = -1

# Segment id of padding in a packed row; documents are numbered 1, 2, ... within a row.
PAD_SEGMENT = 0
