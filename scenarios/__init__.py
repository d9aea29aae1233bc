"""Built-in scenarios, one file per family; each registers itself with @register_scenario."""
