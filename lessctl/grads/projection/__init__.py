"""Random projections of gradient features: TRAK's projectors with LESS's settings, and the count sketch.

LESS projects with TRAK (package `traker`): a Rademacher matrix, seed 0, model_id 0, the input cast
to float16. On a GPU that is `CudaProjector` (the fast_jl kernel, or lessctl's Triton kernel checked
equal to it); elsewhere `BasicProjector` with block size 128. There is never a silent fallback:
`auto` says what it chose, and `cuda` without a working kernel is an error with the fix. Every
projector records what makes its matrix unique in the store (`Projector.attrs`), and matching
refuses to compare stores whose projections differ.
"""
