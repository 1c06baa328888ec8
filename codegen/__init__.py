"""Kernel generation from the typed IR (shipped as attndsl.codegen).

plan.py (token orders, exact block tables) feeds two backends: the generated Triton kernels
(emit.py, triton_gen.py, runtime.py; export.py writes them as modules, flex.py exports a
FlexAttention mask_mod) and the CPU backend (cpu.py). See docs/kernels.md.
"""
