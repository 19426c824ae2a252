"""flctl: the project's command line (configure, check, run, wait, clean up); not shipped in jobs."""
