"""What PEFT and diffusers say while a LoRA file loads, and whether any of it means keys were dropped."""

from __future__ import annotations

import contextlib
import logging
import warnings

#: What PEFT / diffusers say when keys do not bind.
LOSS_OF_KEYS = ("missing", "unexpected key", "inconsisten")


@contextlib.contextmanager
def load_messages():
    """Every warning and diffusers/PEFT log record raised inside the block, as lower-case text."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage().lower())

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield messages
        finally:
            messages.extend(str(w.message).lower() for w in caught)
            for logger in loggers:
                logger.removeHandler(handler)


def lost_keys(messages: list[str]) -> list[str]:
    """The messages that say adapter keys were dropped.

    "No LoRA keys associated to <model> found" is said for every component the file has no keys for: the
    text encoders, which diffalign does not train; for the denoiser it would mean all was lost.
    """
    return [m for m in messages if any(word in m for word in LOSS_OF_KEYS)
            or (m.startswith("no lora keys associated") and "text_encoder" not in m)]
