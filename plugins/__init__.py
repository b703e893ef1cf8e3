"""Trainer integrations: pluggy hook callers that put a controller into a host's training loop.

A plain PyTorch loop needs none of these: ``handle.wrap(optimizer)`` and
``handle.epoch_end()`` drive the controller.
"""
