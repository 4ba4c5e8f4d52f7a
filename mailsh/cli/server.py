"""``mailsh`` server commands."""

from __future__ import annotations
