"""``python -m pytest_hotswap.bench``: measure the pre-padding pattern and our own overhead.

One module per measurement (``swap``, ``stall``, ``padding``, ``end_to_end``, ``overhead``,
``installed``, ``slots``, ``verdict``, ``scaling``), each a ``run(config, workdir) -> Result``;
``models`` builds the Flux-shaped transformers and their adapters, ``timing`` times candidates
interleaved, ``results`` holds the JSON and table forms, ``goals`` the issues' goals (one table),
``plot`` draws the PNG, ``gpu_check`` is the prepared GPU check (``--gpu-check``).

How to read ``results.json`` / ``bench.png`` (absolute times depend on the machine and its load):
every timed value is a median with its spread (``median [q1, q3]`` in the table; ``median``,
``q1``, ``q3``, ``min``, ``max``, ``n`` in the JSON). Candidates compared with each other are
timed interleaved, and a ratio is taken per round, so its spread is the round-to-round spread.

* ``swap_latency``: ms per swap of the reference, PEFT's ``hotswap_adapter_from_state_dict``
  (``peft_fn``) and diffusers' ``load_lora_adapter(hotswap=True)``, next to two copy floors: all
  padded bytes, and only the views the reference writes. ``targets`` holds the goals.
* ``recompile_stall``: ``first_call_ms`` after a hotswap is a normal call; after a recompiling
  swap it is a compile. ``recompiles`` must read 0 and one per swap.
* ``padding_overhead``: ``x_unpadded`` is what computing on padded zeros costs per forward.
* ``end_to_end``: ``speedup_vs_eager`` of the compiled runs, hotswap through diffusers and through
  the reference, against recompiling swaps (the seed: 2.23x against 1.55x on an H100).
* ``plugin_overhead``: ``overhead_ms`` of each mechanism the ``no_recompile`` marker uses.
* ``installed_plugin``: the whole-process cost of the installed plugin on a suite that does not
  use it (wall time, peak memory, whether torch got imported).
* ``slots``: the forward and swap cost of N adapter slots against one.
* ``verdict_cost``: the call that fails a ``no_recompile`` test, refused at the guard or compiled.
* ``scaling``: whole conformance runs (a subset) with 1 and 2 xdist workers, and a second run
  sharing the compile cache (a directory, Redis): seconds, compiles, FX graph cache hits and
  misses, and whether every verdict is the first run's.
"""
