"""Answer verification for verifiable-math rewards (config group ``verifier``).

``MathVerifier`` grades full responses against bare gold answers with math-verify in worker processes (safe
off the main thread, hard per-item timeout); ``ArithExactVerifier`` grades the embedded arithmetic task;
``NoisyVerifier`` and ``HackableVerifier`` wrap either to study noisy and exploitable rewards.
"""

from alignlab.verify.extract import answer_key, extract_answer, extract_boxed, normalize_answer, parse_number
from alignlab.verify.reward_fn import RewardFnVerifier
from alignlab.verify.verifiers import (
    ArithExactVerifier,
    HackableVerifier,
    MathVerifier,
    NoisyVerifier,
    Verdict,
    Verifier,
    check_with_sources,
)

__all__ = [
    "Verdict",
    "Verifier",
    "MathVerifier",
    "ArithExactVerifier",
    "NoisyVerifier",
    "HackableVerifier",
    "RewardFnVerifier",
    "check_with_sources",
    "extract_answer",
    "extract_boxed",
    "normalize_answer",
    "answer_key",
    "parse_number",
]
