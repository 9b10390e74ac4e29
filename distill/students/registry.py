"""The student registry: ``@register_student`` on an entrypoint that builds one tower by name."""
from __future__ import annotations

from ..registry import Registry

STUDENTS = Registry("student")
register_student = STUDENTS.register

__all__ = ["STUDENTS", "register_student"]
