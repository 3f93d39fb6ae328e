"""The browser: the live viewer (``viewer.py`` + ``viewer.html``: a local server that streams the
engine's frames) and the self-contained HTML export (``export.py`` + ``nca.js`` + ``page.html``: WebGL2)."""
from .export import export_html, export_problem, page

__all__ = ["export_html", "export_problem", "page"]
