"""Benchmarks (GPU): `python -m entrypoints.bench attention|models|step ... [--json PATH]`.

One module per benchmark (attention.py, models.py, step.py), each adding its subcommand with
`add_<name>(subparsers)` in __main__.py; common.py holds the timer, provenance and JSON writer. Timings are medians
of many warm runs (triton.testing.do_bench, L2 flushed between runs; forward rows also replayed from
a CUDA graph, the device time without the host's dispatch); TFLOP/s use the FLOP formula
printed beside each row. Results go to stdout as a Markdown table and, with --json, to a file
holding device, date, commit and command (docs/benchmarks.md records them).
"""
