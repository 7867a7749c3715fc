"""The self-contained training job shipped to the GPU machine.

Runs with only Python + torch, transformers, peft, bitsandbytes (accelerate for several GPUs);
nothing here imports ftplan's `planner` or `providers`.
"""
