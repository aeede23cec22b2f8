"""``python -m overtone`` runs the command line."""

from overtone.cli import app

app()
