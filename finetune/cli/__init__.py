"""The `domainclip` command: one argparse tree, one module per command, heavy imports only inside run()."""
