"""`python -m qtasks.plugins > docs/triggers.md`: print the table of every trigger."""

from qtasks.plugins.triggers import render_markdown

print(render_markdown(), end="")
