"""Terminal login guard: the login decision, the PAM entry point, user messages and daily notices."""
