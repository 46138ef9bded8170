"""The serving runtime: paged KV cache, scheduler, graph-captured decode, sampling, engine."""
