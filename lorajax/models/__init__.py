"""Reference models for lorajax: `lorajax.models.llama`."""

from lorajax.models import llama

__all__ = ("llama",)
