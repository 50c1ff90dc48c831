"""The bundled conformance suite: hotswap scenarios x pipelines x implementations.

Run it against the installed torch / diffusers / PEFT stack::

    pytest --pyargs pytest_hotswap.conformance --hotswap-max-rank=128 --hotswap-backend=inductor

Every scenario runs on each pipeline of ``--hotswap-pipelines`` with each implementation of
``--hotswap-implementations`` ("diffusers" = diffusers + PEFT as installed, "reference" = ours) and
checks zero recompiles, output equal to a fresh eager load of the same adapter, and, for rejected
adapters, the error and a model left bit-for-bit untouched. Known upstream defects are
``xfail(strict=True)``, so the day upstream fixes one the run turns red and the matrix is updated.
The run ends with the scenario x pipeline x implementation matrix.
"""
