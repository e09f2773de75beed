"""C++ kernels for XLA:CPU (FFI), built for the host on first use; see `build`."""
