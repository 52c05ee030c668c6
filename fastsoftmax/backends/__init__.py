"""Host code that launches the kernels, one module per device.

* :mod:`.cpu`: NumPy arrays in (no torch): picks the serial or parallel
  twin, builds the work queue and scratch, checks class indices.
* :mod:`.cuda`: CUDA tensors in, kernels launched on torch's current stream.
"""
