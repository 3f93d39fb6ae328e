"""Everything that runs on a GPU, one job per file.

Triton kernels (import only Triton; each docstring states the bytes and FLOPs its kernels move and
compute): ``step.py`` (the fused step and finalize), ``step_backward.py`` (its backward),
``decode.py`` (LPPN and pixel-shuffle decode), ``pixel_shuffle.py`` (the head both share),
``operand.py`` (a TF32 hidden layer handed to the next dot without moving it). Around
them: ``config.py`` (constexprs, tile shapes, what can run), ``pack.py`` (weight layouts and their
cache), ``launch.py`` (launchers), ``op.py`` (the ``nca_fast::fused_step`` torch op and its
autograd), ``rollout.py`` (fused rollouts), ``catalogue.py`` (every configuration the dispatchers
can pick) and ``compile.py`` (compiling them without a GPU).
"""
