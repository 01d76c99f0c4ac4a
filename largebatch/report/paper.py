"""The LAMB paper's Table 1, as plain data: only numbers checked against the paper (arXiv 1904.00962 v1).

Kept as the strings printed in the paper so nothing is re-rounded. They are the paper's numbers
(BERT-Large, SQuAD v1.1 dev F1, TPUv3 pods), never ours, and every rendering labels them so.
"""

from __future__ import annotations

TABLE1_LABEL = "[checked] from arXiv 1904.00962 v1 Table 1"
TABLE1_CAPTION = ("BERT-Large pretraining with LAMB (first row: the Devlin et al. baseline), fine-tuned on "
                  "SQuAD v1.1; F1 on the dev set. The paper's numbers, not ours: the paper measures SQuAD F1 "
                  "of BERT-Large on TPUs, this project measures a small model's masked-LM loss, so compare "
                  "the shape across batch sizes, not the values.")
TABLE1_COLUMNS = ["batch", "steps", "F1", "TPUs", "time"]
TABLE1_ROWS = [
    ["512 (baseline, Devlin et al.)", "1000k", "90.395", "16", "81.4 h"],
    ["512", "1000k", "90.720", "16", "82.8 h"],
    ["1k", "500k", "90.377", "32", "43.2 h"],
    ["2k", "250k", "90.751", "64", "21.4 h"],
    ["4k", "125k", "90.548", "128", "693.6 m"],
    ["8k", "62k", "90.556", "256", "390.5 m"],
    ["16k", "31k", "90.679", "512", "200.0 m"],
    ["32k", "15.6k", "91.460", "1024", "101.2 m"],
    ["64k/32k (mixed)", "8599", "90.584", "1024", "76.19 m"],
]
CHECKED_FACTS = [
    "AdamW stops scaling beyond batch 16k (SQuAD F1 88.1 vs a target of 90.4).",
    "LAMB beats LARS at every batch size.",
    "Mixed batch: 65,536 at sequence length 128 for the first 9/10 of the epochs, then 32,768 at 512 for the "
    "last 1/10, with the learning rate warmed up again from 0 in stage 2.",
]
