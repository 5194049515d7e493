"""The stages as a library: each takes a frozen config and returns a frozen result.

``extract`` (GSFs into the store), ``distill`` (teacher knowledge), ``train`` (a student on Ray
Train), ``evaluate`` and ``predict`` (score a checkpoint), ``pipeline`` (composes the others,
and ``plan`` says what a run would reuse and compute) and ``report`` (markdown and PNGs). The
jobs in ``ray_jobs/<job>.py`` only parse a config, call one of these and print the result.
"""
