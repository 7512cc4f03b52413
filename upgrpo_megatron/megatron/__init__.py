"""Everything that imports megatron-core: the model, the actor, checkpoints, sharding, process groups.

Importing this package applies the CPU compatibility patches once (`compat.apply_cpu_patches`, inert when CUDA
is present), before any of its modules imports megatron-core. Code outside this package never imports
megatron-core, so importing the pure parts of the project (losses, diagnostics, conversion maps, config)
patches nothing.
"""

from upgrpo_megatron.megatron import compat

compat.apply_cpu_patches()
