"""Generation: the engine thread that owns the kernels (`scheduler`: queue, slots, batching),
the decode loop (`generate`: prefill, decode, JSON mode), sampling and stop strings. Works on
any loaded model through its forward and cache; may import only `hybrid.files` below it."""
