"""Run folders: numbering and logging, markers and locks, the early log buffer, the HTML report."""
