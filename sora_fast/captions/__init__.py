"""Re-captioning and prompt expansion: the caption schema, captioners that fill it, and prompt expanders.

- :mod:`~sora_fast.captions.schema`: :class:`CaptionSchema` (validated JSON in and out, JSON Schema, rendering
  to the training captions' text).
- :mod:`~sora_fast.captions.base`: :class:`Captioner` and :class:`CaptionOutcome` (what every captioner returns).
"""
from .base import Captioner, CaptionOutcome
from .schema import ACTIONS, CAMERA_MOTIONS, DIRECTIONS, INTERACTIONS, SPEEDS, CaptionSchema, Span, Subject

__all__ = ["CaptionOutcome", "Captioner", "CaptionSchema", "Span", "Subject",
           "ACTIONS", "CAMERA_MOTIONS", "DIRECTIONS", "INTERACTIONS", "SPEEDS"]
