"""jaxalign: preference alignment of language models in JAX/Flax."""

import logging

__version__ = "0.1.0"


class _NoTorchAdvice(logging.Filter):
    """Drops transformers' import-time "PyTorch was not found" advice.

    jaxalign uses transformers only for tokenizers and configs, which need no torch; the advice (logged once
    when transformers is imported without torch) suggests a broken install to a user who has nothing to fix.
    Only that one message is dropped: every other transformers warning still shows.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("PyTorch was not found")


# transformers logs it on its package logger; a filter there sees it before any handler does.
logging.getLogger("transformers").addFilter(_NoTorchAdvice())
