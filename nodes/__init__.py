"""Built-in graph nodes, registered with the runtime by module."""
