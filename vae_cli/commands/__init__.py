"""The commands: one module per subcommand, and the dispatcher (main.py), the one place
where errors become one line and an exit code."""
