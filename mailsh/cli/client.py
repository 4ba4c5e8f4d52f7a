"""``mailsh`` client commands."""

from __future__ import annotations
