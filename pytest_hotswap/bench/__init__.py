"""``python -m pytest_hotswap.bench``: measure the pre-padding pattern and our own overhead.

One module per measurement (``swap``, ``stall``, ``padding``, ``end_to_end``, ``overhead``), each a
``run(config, workdir) -> Result``; ``models`` builds the Flux-shaped transformers and their
adapters, ``results`` holds the JSON and table forms, ``plot`` draws the PNG.

How to read ``results.json`` / ``bench.png`` (ratios from one run; absolute times depend on the
machine and its load):

* ``swap_latency``: ms per swap next to the copy floor; ``reference_x_floor`` should stay small
  and ``peft_x_reference`` grows with the number of LoRA layers (the deep model), since PEFT's
  excess is Python work per layer. ``targets`` says whether the issue's goals were met.
* ``recompile_stall``: ``first_call_ms`` after a hotswap is a normal call; after a recompiling swap
  it is a compile. ``recompiles`` must read 0 and 1.
* ``padding_overhead``: ``x_unpadded`` is what computing on padded zeros costs per forward.
* ``end_to_end``: ``speedup_vs_eager`` of the compiled runs; compare the hotswap row with the
  recompiling one (the seed: 2.23x against 1.55x on an H100).
* ``plugin_overhead``: ``overhead_ms`` of a watched call, of a watcher's enter and exit, and of a
  ``no_recompile`` test over a plain one.
"""
