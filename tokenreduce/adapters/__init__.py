"""How reducers are placed into model families."""
