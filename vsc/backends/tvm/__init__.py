"""TVM-compiled CPU kernels (GGUF quantized linear layers). `build` needs the TVM compiler;
the runtime side is `vsc.runtime.kernels.tvm_ops`."""
from vsc.backends.tvm.build import TvmBuildError, build_quant_kernels, detect_mcpu, host_target

__all__ = ["TvmBuildError", "build_quant_kernels", "detect_mcpu", "host_target"]
