"""The book's machinery: the ``atlas`` command line, chapter runs (papermill), the chapters' parameter
checks, the rendered book's browser check, results comparison and the build benchmark.

Nothing here computes a number the book reports: no chapter imports this package, so editing it reruns
no chapter (``runner.chapter_code``).
"""
