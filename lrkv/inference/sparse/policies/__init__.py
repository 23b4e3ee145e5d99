"""One file per selection policy; registry.py names them."""
