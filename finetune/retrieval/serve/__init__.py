"""`domainclip serve`: an HTTP service over an index folder (app.py), its micro-batcher (batcher.py),
request limits (limits.py); the command is finetune/cli/serve.py."""
