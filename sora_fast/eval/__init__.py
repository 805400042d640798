"""Evaluation of generated videos: how well the conditioned modes work (:mod:`.conditioning`)."""
from .conditioning import (
    MODES,
    TARGETS,
    ConditioningThresholds,
    Verdict,
    evaluate_conditioning,
    format_table,
    held_out_specs,
    judge_edit,
    judge_extension,
    judge_keyframes,
    judge_long,
)

__all__ = ["MODES", "TARGETS", "ConditioningThresholds", "Verdict", "evaluate_conditioning", "format_table",
           "held_out_specs", "judge_edit", "judge_extension", "judge_keyframes", "judge_long"]
