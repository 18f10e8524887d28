"""`klein-style`: the command line, the top layer (nothing imports it)."""
