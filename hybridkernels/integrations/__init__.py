"""Drop-in use of hybridkernels from other libraries (imported on demand: ``import hybridkernels``
never imports transformers). See :mod:`hybridkernels.integrations.hf`."""
