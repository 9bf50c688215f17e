"""`domainclip serve`: an HTTP service over an index folder (app.py), its micro-batcher (batcher.py),
request limits (limits.py) and the command (command.py)."""
