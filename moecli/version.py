"""The release number (read by the CLI's `--version`, written into every checkpoint and report)."""

__version__ = "0.1.0"
