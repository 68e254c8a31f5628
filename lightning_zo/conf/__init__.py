"""Hydra configs of the lightning-zo command (a package, so that Hydra finds them inside an installed wheel)."""
