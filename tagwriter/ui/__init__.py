"""The Rich live panel: a pure function from a metrics snapshot to a renderable."""

from tagwriter.ui.panel import render_panel

__all__ = ["render_panel"]
