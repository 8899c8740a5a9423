"""Users, API tokens, sessions, permissions (who may see which study), sign-in and admin pages, their CLI."""
