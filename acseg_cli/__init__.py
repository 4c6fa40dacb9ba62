"""acseg's command line: one module per command, registered explicitly in ``app``."""
