"""The commands: thin callers of the runtime (`cli` parses and dispatches; no command imports
another)."""
