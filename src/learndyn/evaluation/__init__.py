"""Evaluation of finetuned models by what they generate: response files and intrinsic measures.

    responses.py   generate responses for held-out prompts into a response file (format: learndyn.responses)
    intrinsic.py   measures of a set of generations (length, distinct-n, repetition) and of the
                   model on held-out chosen responses (log-probability, argmax_logp)

The arms of the paper's comparison (baseline vs extended SFT before DPO) are expected to differ in
all of them; the judges compare the same response files pairwise.
"""
