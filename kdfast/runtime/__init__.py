"""The lowest layer: backend dispatch, devices and precisions, distributed process groups, progress output,
the argument checks every layer shares, and the torch-free walk of an image folder (run in a process of its own
before torch is imported). Imports nothing of kdfast above kdfast.errors."""
