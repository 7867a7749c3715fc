"""ftplan's planner: model specs, memory/time estimates, offers, launch orchestration.

Nothing in this package imports torch or transformers at module level: `ftplan estimate`
has to start in a fraction of a second. Heavy libraries live in `remote_job/` and tests.
"""

from ftplan import __version__  # noqa: F401  (one version, kept by the ftplan package)
