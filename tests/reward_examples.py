"""Small real reward functions in the peers' shapes, imported by dotted path in tests/test_reward_fn.py."""

from __future__ import annotations

import re


def compute_score(data_source, solution_str, ground_truth, extra_info=None, format_score=0.1, score=1.0):
    """verl's GSM8K rule (verl/utils/reward_score/gsm8k.py, strict): the number after the last '#### '."""
    m = re.findall(r"#### (\-?[0-9\.\,]+)", solution_str)
    if not m:
        return 0.0
    return score if m[-1].replace(",", "") == str(ground_truth) else format_score


def boxed_reward(completions, ground_truth, **kwargs):
    """TRL reward_funcs shape: 1.0 if the last \\boxed{} holds the answer, -1.0 otherwise, None without a box."""
    out = []
    for c, g in zip(completions, ground_truth):
        m = re.findall(r"\\boxed\{([^{}]*)\}", c)
        out.append(None if not m else (1.0 if m[-1].strip() == str(g) else -1.0))
    return out


def last_number_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl shape: 1.0 when the last number in the response is the ground truth, else 0.0."""
    m = re.findall(r"-?\d+", solution_str)
    return float(bool(m) and m[-1] == str(ground_truth))


def length_reward(completions, **kwargs):
    """TRL shape: the response's length in characters / 100 (a stand-in for a learned reward model's score)."""
    return [len(c) / 100 for c in completions]
