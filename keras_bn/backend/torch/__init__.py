"""PyTorch's own kernels for keras_bn: torch's native batch norm where it
serves (`native_kernel`), and the choice between it and the keras.ops
kernel per call (`dispatch`)."""
