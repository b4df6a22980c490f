"""The fault matrix: real processes and real stores, each scenario marked `@pytest.mark.fault("<name>")`.

tests/conftest.py prints one row per scenario (outcome, duration, note) at the end of the run.
"""
