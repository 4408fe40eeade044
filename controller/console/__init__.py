"""The web console: server-rendered pages (Jinja2, htmx for live parts), Japanese first, English by catalogue."""
