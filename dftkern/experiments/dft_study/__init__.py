"""DFT vs SFT as the DFT paper runs it, on the built-in addition task (issue 11)."""
