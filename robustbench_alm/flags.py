"""Evaluation flags: what the harness saw that makes a robustness number less trustworthy.

Each flag is a short machine-readable name stored in the entry's ``flags`` list (a flag about
one attack stage carries the stage after a colon, e.g. ``out-of-budget:apgd-ce``). The
leaderboard shows them beside the numbers. AutoAttack prints similar warnings to a log that
nobody reads; here they travel with the result.

Vocabulary layer: plain Python; no torch.
"""

from __future__ import annotations

__all__ = ["FLAGS", "flag_name", "describe"]

#: Every flag the harness can raise, with what it means for the reader of an entry.
FLAGS: dict[str, str] = {
    "probability-outputs": (
        "the model's outputs look like probabilities (non-negative rows summing to 1), not "
        "logits; cross-entropy attacks on probabilities suffer vanishing gradients, so robust "
        "accuracy may be overestimated. Return logits (drop the final softmax)."),
    "zero-gradients": (
        "the input gradient of the loss is exactly zero for some correctly classified points; "
        "gradient attacks cannot move them, so robust accuracy may be overestimated."),
    "non-finite-logits": (
        "the model returned NaN or infinite logits for some points (clean or adversarial); "
        "they are counted as not robust and never kept as adversarial examples."),
    "black-box-beats-white-box": (
        "a black-box stage broke points that every gradient stage before it missed: a typical "
        "sign of gradient masking. Treat the white-box numbers with suspicion."),
    "randomized": (
        "repeated forward passes on the same input disagree: the defense is stochastic. Each "
        "point was decided by a majority over several passes; use the rand suite (EOT)."),
    "out-of-budget": (
        "an attack returned inputs outside the eps-ball or the [0, 1] box; those inputs were "
        "not counted as broken."),
    "model-state-changed": (
        "the model's parameters or buffers changed during the evaluation (they were restored); "
        "the model may not be a fixed function."),
    "half-precision": (
        "the model runs in half precision; attacks ran on a float32 copy and every adversarial "
        "example was re-scored by the half-precision model itself."),
    "substitute-loss": (
        "a stage's loss needs more classes than the model has and was replaced by a named "
        "substitute (see the stage's record)."),
    "autoattack-unreliable": (
        "imported from RobustBench, which marks this entry's AutoAttack evaluation as "
        "unreliable (an adaptive attack found lower robust accuracy)."),
    "record-dataset-mismatch": (
        "imported from RobustBench: the record's dataset field disagrees with the leaderboard "
        "folder it is filed in; the folder was taken as correct."),
    "large-eps": (
        "eps is unusually large for the threat model on [0, 1] inputs (Linf above 0.3); check "
        "that it is what was meant."),
}


def flag_name(flag: str) -> str:
    """The flag without its stage suffix: ``out-of-budget:fgsm`` gives ``out-of-budget``."""
    return flag.split(":", 1)[0]


def describe(flag: str) -> str:
    """What ``flag`` means; raises ValueError for a flag the harness does not define."""
    name = flag_name(flag)
    if name not in FLAGS:
        raise ValueError(f"unknown flag {flag!r}; known flags: {', '.join(sorted(FLAGS))}")
    return FLAGS[name]
