"""The numerics tests' machinery (tests/test_numerics.py runs it; docs/numerics.md says what it guards):
the synthetic cache (synth), the cases (cases), running and comparing them (golden), the recorder (record)."""
