"""The applications on top of the compiler: CLI, demo, bench, built-in models, data."""
