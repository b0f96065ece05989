"""Thin asyncio shells around the sans-IO cores."""
