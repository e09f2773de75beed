"""C++ kernels for XLA:CPU (FFI), built for the host on first use; see `build`."""


def partial_items(n: int) -> int:
    """Work items (and so partial sums) of a kernel's backward over n units: walrus_jax::partial_items
    in parallel.h, which fixes the partials' leading dimension."""
    return min(n, 64)
