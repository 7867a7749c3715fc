"""One module per CLI command group; `ftplan.planner.cli` imports them lazily."""
