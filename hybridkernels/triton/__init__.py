"""Triton kernels. Importing a submodule imports triton; ``hybridkernels`` itself does not.

Every kernel module registers its ahead-of-time compile cases with
:func:`hybridkernels.triton.registry.compile_cases` so the GPU-free compile check
(``pytest -m compile``, ``hybridkernels info --kernels``) covers it without a second list.
"""
