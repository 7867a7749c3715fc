"""ftplan: which GPU, for how long, at what price, and run it for me.

The repository keeps four top-level folders that install under this one import name:
`ftplan.planner` (estimate → price → launch → record, and the CLI), `ftplan.providers` (one adapter per
cloud), `ftplan.remote_job` (the training job shipped to the machine) and `ftplan.catalogs` (data).
"""

__version__ = "0.1.0"
