"""Programs that use the library, apart from it: the command line, the D2L model, benchmarks, the precision report.

* :mod:`.cli`: ``fastsoftmax train | precision | bench | demo``.
* :mod:`.d2l`: the softmax regression of *Dive into Deep Learning* and its data.
* :mod:`.naive`: the textbook softmax and cross-entropy, the baseline.
* :mod:`.bench`: the benchmark matrix; :mod:`.precision`: the overflow report.
"""
