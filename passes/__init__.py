"""Passes over the xbitc IR. Built-ins register through the same `xbitc.passes` entry points as plugins."""
from .base import Pass, PassContext, PassError, PassManager, parse_spec

__all__ = ["Pass", "PassContext", "PassError", "PassManager", "parse_spec"]
