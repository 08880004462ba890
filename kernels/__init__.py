"""Triton kernels of aimkp, installed as ``aimkp.kernels``.

Importing this package imports nothing heavy; each kernel module imports triton itself. On a
machine without a CUDA device the kernels run on CPU tensors through Triton's interpreter: set
``TRITON_INTERPRET=1`` before triton is first imported.
"""
