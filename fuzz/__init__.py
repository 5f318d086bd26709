"""Coverage-guided fuzzing of the store's parsers of untrusted bytes (`nox -s fuzz`).

Layout (the contract every target keeps):

- ``fuzz/targets/<name>.py`` exposes ``ALLOWED: tuple[type[BaseException], ...]`` (the typed
  errors the code under test may raise for bad input) and ``def one_input(data: bytes) ->
  None``. Anything else raised — an untyped exception, a failed invariant (``AssertionError``),
  a hang past the per-input timeout, a memory blow-up — is a bug.
- ``fuzz/corpus/<name>/`` holds the committed seed inputs (``python -m fuzz.make_corpus``
  regenerates the generated ones).
- ``fuzz/regressions/<name>/`` holds inputs that once found a bug; the engine saves new
  findings there. ``tests/fuzz_regressions`` replays every file of ``corpus`` and
  ``regressions`` through its target in the normal test session.

Engine: atheris (libFuzzer for CPython), one process per target, see :mod:`fuzz.run`.
Adding a target is one file in ``fuzz/targets/`` plus its seeds in ``fuzz/corpus/<name>/``.
"""
