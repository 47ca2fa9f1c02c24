"""One module per revision of the study database schema, oldest first (``r0001_baseline``)."""
