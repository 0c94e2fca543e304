"""Sphinx extension: each chapter page offers its MyST source (.md) next to the .ipynb download,
and launch buttons appear only when ``repository.url`` is set in ``_config.yml``.

The chapters are paired notebooks (``notebooks/NAME.md`` and ``NAME.ipynb``); the book renders
the .ipynb, so the theme's download menu offers that file. This adds the paired .md, copied into
``_sources/notebooks/`` of the built book.
"""
from __future__ import annotations

import shutil
from pathlib import Path


def _md_source(app, pagename: str) -> Path | None:
    if not pagename.startswith("notebooks/"):
        return None
    path = Path(app.srcdir) / f"{pagename}.md"
    return path if path.exists() else None


def add_md_button(app, pagename, templatename, context, doctree):
    if _md_source(app, pagename) is None:
        return
    for group in context.get("header_buttons", []):
        if group.get("label") == "download-buttons":
            group["buttons"].insert(1, {
                "type": "link",
                "url": f"{context['pathto']('_sources', 1)}/{pagename}.md",
                "text": ".md",
                "tooltip": "Download the chapter's MyST markdown source (jupytext)",
                "icon": "fas fa-file-lines",
                "label": "download-md-button",
            })


def copy_md_sources(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    for docname in app.env.found_docs:
        src = _md_source(app, docname)
        if src is not None:
            dest = Path(app.outdir) / "_sources" / f"{docname}.md"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)


def hide_launch_buttons_without_a_repository(app, config):
    """Launch links (Binder, Colab) need the repository's URL: without one, configure none."""
    opts = config.html_theme_options
    if not opts.get("repository_url"):
        opts.pop("launch_buttons", None)


def setup(app):
    app.connect("config-inited", hide_launch_buttons_without_a_repository)
    app.connect("html-page-context", add_md_button, priority=600)  # after the theme's buttons
    app.connect("build-finished", copy_md_sources)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
