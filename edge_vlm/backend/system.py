"""What this llama.cpp build can do, for ``edge-vlm info`` and the loader."""

from __future__ import annotations

from edge_vlm.backend._lib import init_once, llama_cpp


def supports_gpu_offload() -> bool:
    """Whether this llama.cpp build can offload to a GPU (Metal, CUDA, Vulkan...)."""
    init_once()
    return bool(llama_cpp.llama_supports_gpu_offload())


def system_info() -> dict[str, str]:
    """llama.cpp's build and CPU feature string, and the llama-cpp-python version."""
    init_once()
    return {
        "llama_cpp_python": str(llama_cpp.__version__),
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "gpu_offload": str(bool(llama_cpp.llama_supports_gpu_offload())),
        "mmap": str(bool(llama_cpp.llama_supports_mmap())),
    }
