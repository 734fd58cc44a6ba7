"""Hourly PostgreSQL -> MongoDB reconciliation as a Dagster project."""

import pandas as pd

# pyarrow is installed for the IO manager's Parquet files; pandas 3 would then back every `str`
# column with Arrow ("auto" storage). Keep Python string objects, as measured and relied on
# (core.frames.share_strings shares them, core.kernel.factorize_objects reuses their cached hashes).
pd.set_option("mode.string_storage", "python")
