"""One module per CLI command group; `planner.cli` imports them lazily."""
