"""Evaluation of generated videos: how well the conditioned modes work (:mod:`.conditioning`), world-model
probes from a caption (:mod:`.probes`) and model-free video metrics (:mod:`.metrics`)."""
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
from .metrics import METRICS, dynamic_degree, motion_smoothness, psnr, ssim, temporal_flickering
from .probes import PROBES, ProbeReport, ProbeTolerances, pass_rates, probe_clip

__all__ = ["METRICS", "dynamic_degree", "motion_smoothness", "psnr", "ssim", "temporal_flickering",
           "PROBES", "ProbeReport", "ProbeTolerances", "pass_rates", "probe_clip",
           "MODES", "TARGETS", "ConditioningThresholds", "Verdict", "evaluate_conditioning", "format_table",
           "held_out_specs", "judge_edit", "judge_extension", "judge_keyframes", "judge_long"]
