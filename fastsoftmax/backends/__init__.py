"""Host code that launches the kernels, one module per device.

* :mod:`.cpu`: NumPy arrays in (no torch): picks the serial or parallel
  twin, builds the work queue and scratch, checks class indices.
* :mod:`.cuda`: CUDA arrays and a stream in (no torch): picks each kernel by
  row length, takes the 16-byte path where rows allow it.
"""
