"""The generation core: Fooocus's semantics as plain Python over a small model interface.

Importing the package is cheap (no torch): the frontend reads `presets` and `interfaces` from
here. Modules that compute (`generate`, `samplers`, `schedules`, `text`) import torch.
"""
