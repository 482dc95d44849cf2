"""Generation defaults the app and the labeling CLI share (no torch import: argument parsing stays fast)."""

# The bundled model loops on a repeated phrase in 12.5 % of its answers at 512 new tokens (temperature 0.7); a
# penalty of 1.1 brought that to 6.3 % (bench/README.md, "Does the loop move the model?"). 1.15 cut loops further
# (4.7 %) but also lists: a list repeats its markers, and answers laid out as a list fell from 48 % to 26-31 %.
# 1 = off.
REPETITION_PENALTY = 1.1
