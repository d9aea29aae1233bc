"""Built-in strategies, one file per method; each registers itself with @register_strategy."""
