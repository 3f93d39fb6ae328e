"""The browser: a self-contained HTML export of a model (WebGL2)."""
from .export import export_html, export_problem, page

__all__ = ["export_html", "export_problem", "page"]
