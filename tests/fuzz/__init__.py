"""attndsl's own fuzzer: mutate.py makes the cases, runner.py runs and classifies them."""
