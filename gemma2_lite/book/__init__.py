"""The machinery that drives the book's chapters; not the library.

Everything under ``gemma2_lite.book`` exists because the book does: the programs that made the
files the chapters show and the repository ships, and what those programs write and read.

* ``python -m gemma2_lite.book.experiments NAME``: the training experiments and ablations the
  chapters cite (:mod:`.experiments`); their results files and figures
  (:mod:`.experiment_outputs`); the sealed seed records in ``data/ablations/``
  (:mod:`.seed_records`).
* ``python -m gemma2_lite.book.tokenizer train``: retrains the book's tokenizer (the shipped
  ``assets/tokenizer.model``); ``encode TEXT`` shows how it splits a text.
* ``python -m gemma2_lite.book.fixtures OUT_DIR``: writes the tiny release-layout checkpoints.
  The writer itself (:mod:`gemma2_lite.fixtures`) stays in the library, because
  :func:`gemma2_lite.weights.locate` falls back on it when the real weights are absent.

The library (``gemma2_lite`` outside this folder) never imports from here
(``tests/test_package_shape.py`` keeps it so). The installed command line,
``python -m gemma2_lite`` (generate, chat), is the library's and stays thin.
"""
