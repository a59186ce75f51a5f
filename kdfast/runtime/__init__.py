"""The lowest layer: backend dispatch, devices and precisions, distributed process groups, progress output and
the argument checks every layer shares. Imports nothing of kdfast above kdfast.errors."""
