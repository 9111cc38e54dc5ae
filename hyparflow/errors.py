"""Errors hyparflow raises for bad input, before any rank communicates."""


class ConfigError(ValueError):
    """A model, plan, data or launch setting that cannot work; the message says how to fix it."""
