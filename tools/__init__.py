"""Tools built on the core: evaluation of samplers, the classic's ablations, the benchmark, the README's figures."""
