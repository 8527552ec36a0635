"""Adapters: the only code that touches a Keras flavour's internals."""
