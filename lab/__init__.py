"""The lab: benchmarks and experiments that measure tuneonce, not part of it (issue #15: the lab leaves the wheel).

Importable from a checkout only (scripts/ put the repository root on sys.path; pytest's pythonpath does the same);
pyproject.toml lists the tuneonce packages one by one, so nothing here goes into the wheel. Lab code imports
tuneonce; tuneonce never imports the lab (scripts/check_imports.py checks both).
"""
