"""Console accounts (issue 12): users with roles, passwords, sessions, CSRF, TOTP, API tokens, the role matrix.

``roles`` holds the matrix and ``require``; ``service`` the accounts themselves (users, sessions, tokens,
sign-in with throttling); ``authn`` turns a request into an ``Actor``; ``web`` the sign-in routes;
``cli`` the `sekisho users` commands.
"""
