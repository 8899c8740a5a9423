"""Teleneurology consults: rooms, signaling, media jobs, recordings, TURN, pages, CLI."""
