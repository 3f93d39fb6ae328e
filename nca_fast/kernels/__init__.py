"""Triton kernels only. Each module's docstring states the bytes and FLOPs its kernels must move and
compute; each exposes ``compile_configs()``: every configuration its dispatcher can pick (see compile.py).
"""
# Modules whose compile_configs() `nca-fast kernels` compiles (a module not written yet is skipped).
KERNEL_MODULES = ("nca_fast.kernels.step", "nca_fast.kernels.decode")
