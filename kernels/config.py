"""Every tunable of fastsoftmax in one place. Tests patch these."""

#: Fast-math flags for the CPU kernels. Deliberately not ``fastmath=True``:
#: without ``nnan`` and ``ninf`` LLVM may not assume away NaN or infinity, so
#: ``-inf`` masks give exact zeros and a NaN stays in its row, as in PyTorch.
#: Without ``reassoc`` and ``contract`` LLVM may not reorder a sum or fuse a
#: multiply into an add: every compilation of a kernel (serial or parallel,
#: fresh or from Numba's cache) then computes each row bit for bit the same,
#: whatever batch it comes in. The sums are vectorised by hand instead
#: (``intrinsics.lane_sum``).
FASTMATH = frozenset({"nsz", "arcp", "afn"})

#: Flags for the exp polynomial and for code that must be evaluated as
#: written: no ``reassoc`` and no ``afn``. ``contract`` lets the polynomial's
#: multiply-adds and the one-part ln2 reduction be single FMAs, each of them
#: one multiply and one add, so the fused form is the only one.
FASTMATH_EXACT = frozenset({"nsz", "contract"})

#: Below this many elements the CPU kernels run on the calling thread:
#: waking the thread pool costs more than the work.
CPU_PARALLEL_MIN_ELEMENTS = 1 << 15

#: The parallel CPU kernels' threads claim rows from a shared counter, in
#: claims of about rows / (threads x this) rows. A thread that runs slower
#: (descheduled, or on a busy core of a virtual machine) then takes fewer
#: rows instead of holding up the op with a fixed share; at the end the
#: faster thread waits for at most one claim.
CPU_CLAIMS_PER_THREAD = 64

#: ...but no claim is smaller than this many elements, so that claiming
#: (one atomic add) stays negligible on narrow rows.
CPU_MIN_CLAIM_ELEMENTS = 1 << 14

#: While computing row i the CPU kernels prefetch row i + this. One row
#: ahead keeps the row being computed, the prefetched one and the scratch row
#: (3 x 128 KiB at 32000 float32 columns) inside a 512 KiB L2; two rows ahead
#: overflow it. Read when the kernels are compiled.
CPU_PREFETCH_ROWS = 1

#: Rows of at most this many classes (the book's 10) are transposed for the
#: middle-axis kernels, which vectorise across rows; the row kernels would
#: compute each row's few exponentials one at a time. At most 16, so that
#: both kernels add a row's terms in the same order (one block of classes).
CPU_SMALL_CLASSES = 16

#: Softmax over a dimension that is not last (dim 1 of NCHW, say) runs the
#: middle-axis kernels, with no copies, when at least this many elements lie
#: after that dimension: they vectorise along those. With fewer, the
#: dimension is moved last (a copy in and a copy out) for the row kernels.
CPU_MIDDLE_MIN_INNER = 16

#: The middle-axis kernels work on blocks of C classes x W inner positions,
#: W chosen so that the block of input and output (2 x C x W elements) is
#: about this many bytes. The block is swept three times over C, so it
#: should stay in cache, but each class of each sweep costs a loop set-up,
#: so W should be wide: a block of a few MiB still sits in the last-level
#: cache and amortises the set-up over many positions.
CPU_MIDDLE_BLOCK_BYTES = 2 << 20

#: Outputs of at least this many bytes are written with non-temporal stores
#: (no read of the destination into the cache first). Below it the output
#: fits the last-level cache, where the next op will look for it.
CPU_STREAM_MIN_BYTES = 32 << 20

#: Half-precision tensors on the CPU go through the float32 kernels in
#: chunks of rows of about this many float32 bytes, converted on the way in
#: and out, so that no whole float32 copy of the input or output is made.
CPU_HALF_CHUNK_BYTES = 32 << 20

#: Linear cross-entropy computes the logits in chunks of rows of about this
#: many bytes (one reused buffer). Every chunk streams all of the weight
#: through two products and reads and writes its whole gradient in a third,
#: so fewer, larger chunks move less memory (64 MiB: 130 rows of a 128k
#: vocabulary).
LINEAR_CE_CHUNK_BYTES = 64 << 20

#: Outputs of at least this many bytes come from the buffer pool
#: (:mod:`fastsoftmax._pool`); smaller ones from ``torch.empty``.
POOL_MIN_BYTES = 1 << 20

#: The most bytes the pool keeps cached for reuse. Freed buffers beyond this
#: are returned to the operating system.
POOL_MAX_CACHED_BYTES = 8 << 30

# --- CUDA -----------------------------------------------------------------
# Launch shapes and the chunks each thread keeps in registers are part of
# each kernel's compiled form (its name says them) and are gated offline
# against its register budget: see kernels/cuda_softmax.py (ITEMS) and
# kernels/cuda.py (the plans).

#: Check class-index targets on CUDA before the kernel runs, raising
#: IndexError for one out of range. This is the only host synchronisation of
#: the CUDA path; it is skipped while a CUDA graph is being captured. With it
#: off, a bad target gives a NaN loss and NaN gradient row, never an
#: out-of-bounds read.
CUDA_CHECK_TARGETS = True
