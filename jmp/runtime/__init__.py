"""Running on several processes: JAX's distributed start, the rendezvous, and the launcher.

- :mod:`~jmp.runtime.distributed`: :func:`~jmp.runtime.distributed.initialize` joins a
  ``jax.distributed`` job (explicit arguments, ``JMP_*`` variables, or cluster auto-detection).
- :mod:`~jmp.runtime.rendezvous`: the check-in that names a missing process, and the peer guard.
- :mod:`~jmp.runtime.launch`: ``jmp launch -n 2 -- train ...``, several local processes.

Nothing here is imported by ``import jmp``.
"""
