"""Generation defaults the app and the labeling CLI share (no torch import: argument parsing stays fast)."""

# The bundled model loops on a repeated phrase in 12 % of its answers at 512 new tokens (temperature 0.7); a penalty
# of 1.15 brought that to 5 % and kept every bench taste within 30-70 % of answers (1.1: 6 %; bench/README.md,
# "Does the loop move the model?"). 1 = off.
REPETITION_PENALTY = 1.15
