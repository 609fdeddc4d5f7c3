"""The graph stages the API and the CLI call: merge, inject, convert, inspect."""
