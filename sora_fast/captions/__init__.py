"""Re-captioning and prompt expansion: the caption schema, captioners that fill it, and prompt expanders.

- :mod:`~sora_fast.captions.schema`: :class:`CaptionSchema` (validated JSON in and out, JSON Schema, rendering
  to the training captions' text).
- :mod:`~sora_fast.captions.base`: :class:`Captioner` and :class:`CaptionOutcome` (what every captioner returns).
- :mod:`~sora_fast.captions.pixel`: :class:`PixelCaptioner` (the synthetic world, read off the pixels by the
  clip checker's tracker); :mod:`~sora_fast.captions.accuracy`: :func:`caption_accuracy`, how exactly it reads
  held-out clips.
- :mod:`~sora_fast.captions.chat`: :class:`ChatClient` and :class:`ChatCaptioner` (any OpenAI-compatible
  chat-completions server with vision; the ``openai`` package of the ``chat`` extra, imported when used).
- :mod:`~sora_fast.captions.expand`: :class:`SchemaExpander` and :class:`ChatExpander` (short prompts into
  training-style captions), filled from :mod:`~sora_fast.captions.stats`' :class:`CaptionStats`.
"""
from .accuracy import caption_accuracy
from .base import Captioner, CaptionOutcome
from .chat import ChatCaptioner, ChatClient, ChatError
from .expand import ChatExpander, Expansion, PromptExpander, SchemaExpander, make_expander
from .pixel import PixelCaptioner
from .schema import ACTIONS, CAMERA_MOTIONS, DIRECTIONS, INTERACTIONS, SPEEDS, CaptionSchema, Span, Subject
from .stats import CaptionStats

__all__ = ["CaptionOutcome", "Captioner", "CaptionSchema", "Span", "Subject",
           "ACTIONS", "CAMERA_MOTIONS", "DIRECTIONS", "INTERACTIONS", "SPEEDS",
           "PixelCaptioner", "caption_accuracy", "ChatClient", "ChatCaptioner", "ChatError",
           "CaptionStats", "Expansion", "PromptExpander", "SchemaExpander", "ChatExpander", "make_expander"]
