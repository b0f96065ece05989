"""The `dst` command: one entry point for every role."""
