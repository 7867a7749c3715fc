"""Launch: project file, launch plan, orchestration, budget guard, teardown, attach, live display."""
