"""`accelerate launch ... -m alignment_core.training ...`: one process of a multi-process round."""

from alignment_core.training.rounds import main

main()
