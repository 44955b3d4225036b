"""The page at ``GET /`` (``page.html``): pick a task, type inputs, see the answers. Plain HTML and a
little script; nothing is fetched from elsewhere."""

from importlib.resources import files

PAGE = (files("adaptune.serve") / "page.html").read_text(encoding="utf-8")
